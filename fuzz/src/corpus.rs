// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Seed inputs for each fuzz target: a few typed inputs that reach the interesting parts of
//! the device at once (a hint round with accepted hints, inflate and deflate with discards,
//! statistics, reporting, snapshot and restore, raw chains, odd layouts), so that a fuzzing
//! run starts from there instead of finding its way on its own.
//!
//! `cargo test` (from `fuzz/`) checks that each seed encodes to bytes that decode back to
//! it, runs it through its target's `run`, and writes it to `corpus/<target>/<name>`, where
//! `cargo fuzz run <target>` picks it up. The files are not committed: CI generates them
//! before fuzzing.

use crate::desc::{RawDesc, RawTable};
use crate::hint::CmdChoice;
use crate::input::{balloon_device as bd, bitmap_offset as bo, hint_desc as hd};
use crate::layout::{Addr, Len, Placement, RegionSpec};

/// A region of `pages` pages after a hole of `gap_pages`, page aligned and whole.
fn region(gap_pages: u8, pages: u8) -> RegionSpec {
    RegionSpec {
        gap_pages,
        pages,
        trim: 0,
        skew: 0,
    }
}

/// An address `page` pages into region `region`.
fn at(region: u8, page: u8) -> Addr {
    Addr::Region {
        region,
        page,
        offset: 0,
    }
}

/// The seeds of `bitmap_offset`.
pub fn bitmap_offset() -> Vec<(&'static str, bo::Input)> {
    let counts = bo::Input {
        words: vec![u64::MAX, 0x5555_5555_5555_5555, 1 << 63, 0, 0xf0],
        queries: vec![(0, 64), (3, 100), (63, 2), (0, 320)],
        raw_queries: vec![(usize::MAX, 2), (1, usize::MAX), (64, 256)],
        placement: bo::Placement::At(0x1_0000_0000),
        regions: vec![
            bo::Region {
                gap_pages: 0,
                len: 16 * 4096,
            },
            bo::Region {
                gap_pages: 2,
                len: 3 * 4096 + 100,
            },
        ],
        ops: vec![
            bo::Op::RawHint {
                gpa: 0x1_0000_0000,
                len: 8192,
            },
            bo::Op::Mark {
                region: 0,
                page: 1,
                len: 4096,
            },
            bo::Op::Sync {
                page_size: 4096,
                words: vec![0b1011, 1 << 17],
            },
            bo::Op::Send { region: 1, page: 0 },
            bo::Op::NearHint {
                region: 1,
                page: -1,
                jitter: 100,
                pages: 2,
                len_jitter: -100,
            },
            bo::Op::MarkAll,
            bo::Op::Sync {
                page_size: 2 << 20,
                words: vec![1],
            },
        ],
    };
    let top = bo::Input {
        words: vec![],
        queries: vec![],
        raw_queries: vec![],
        placement: bo::Placement::EndAtTop,
        regions: vec![
            bo::Region {
                gap_pages: 0,
                len: 8 * 4096,
            },
            bo::Region {
                gap_pages: 1,
                len: 4096 - 1,
            },
            bo::Region {
                gap_pages: 0,
                len: 0,
            },
        ],
        ops: vec![
            bo::Op::RawHint {
                gpa: u64::MAX - 4096,
                len: u64::MAX,
            },
            bo::Op::NearHint {
                region: 0,
                page: 7,
                jitter: 0,
                pages: 3,
                len_jitter: 0,
            },
            bo::Op::Sync {
                page_size: 0,
                words: vec![u64::MAX],
            },
        ],
    };
    vec![("counts-and-hints", counts), ("top-of-address-space", top)]
}

/// A hint of `pages` pages at page `page` of region 1.
fn hint(page: u8, pages: u8) -> hd::HintSpec {
    hd::HintSpec {
        addr: at(1, page),
        len: Len::Pages(pages),
    }
}

/// The input of `hint_desc` over two regions (the rings in the first), with `ops`.
fn hint_input(ops: Vec<hd::Op>) -> hd::Input {
    hd::Input {
        placement: Placement::Low(16),
        regions: vec![region(0, 15), region(4, 31)],
        ring_region: 0,
        max_size_log: 3,
        size_shift: 0,
        stats: true,
        page_poison: false,
        reporting: false,
        event_idx: false,
        indirect_desc: true,
        ack_poison: false,
        ops,
    }
}

/// The seeds of `hint_desc`.
pub fn hint_desc() -> Vec<(&'static str, hd::Input)> {
    let linux = hint_input(vec![
        hd::Op::StartRound,
        hd::Op::LinuxRound {
            hints: vec![vec![hint(2, 2), hint(8, 1)], vec![hint(16, 4)]],
            indirect: false,
            stop: true,
        },
        hd::Op::Done,
        hd::Op::StartRound,
        hd::Op::LinuxRound {
            hints: vec![vec![hint(1, 1), hint(3, 1), hint(5, 1)]],
            indirect: true,
            stop: false,
        },
        hd::Op::StopRound,
    ]);
    let shapes = hint_input(vec![
        hd::Op::StartRound,
        hd::Op::PostProcess(hd::Chain::Good {
            start: 0,
            cmd: Some(hd::CmdSpec {
                value: CmdChoice::Current,
                slot: 0,
                shape: hd::CmdShape::Split(1),
            }),
            hints: vec![hint(4, 2)],
            indirect: None,
            hints_first: false,
        }),
        hd::Op::PostProcess(hd::Chain::Good {
            start: 3,
            cmd: None,
            hints: vec![
                hint(6, 1),
                hd::HintSpec {
                    addr: Addr::End {
                        region: 1,
                        back: 100,
                    },
                    len: Len::Jitter {
                        pages: 1,
                        delta: 50,
                    },
                },
            ],
            indirect: Some(2),
            hints_first: false,
        }),
        hd::Op::PostProcess(hd::Chain::Good {
            start: 5,
            cmd: Some(hd::CmdSpec {
                value: CmdChoice::Stop,
                slot: 1,
                shape: hd::CmdShape::Whole,
            }),
            hints: vec![],
            indirect: None,
            hints_first: false,
        }),
        hd::Op::Pause,
        hd::Op::StartRound,
        hd::Op::Post(hd::Chain::Good {
            start: 1,
            cmd: Some(hd::CmdSpec {
                value: CmdChoice::Current,
                slot: 2,
                shape: hd::CmdShape::Short(2),
            }),
            hints: vec![hint(9, 1)],
            indirect: None,
            hints_first: true,
        }),
        hd::Op::Resume,
        hd::Op::Process,
        hd::Op::ResetSetup,
        hd::Op::Done,
    ]);
    let raw = hint_input(vec![
        hd::Op::StartRound,
        hd::Op::WriteCmd {
            slot: 3,
            value: CmdChoice::Current,
        },
        hd::Op::PostProcess(hd::Chain::Raw {
            head: 0,
            writes: vec![
                (
                    0,
                    RawDesc {
                        addr: Addr::Slot(3),
                        len: Len::Raw(4),
                        flags: 1,
                        next: 1,
                    },
                ),
                (
                    1,
                    RawDesc {
                        addr: Addr::Table(0),
                        len: Len::Raw(32),
                        flags: 4,
                        next: 0,
                    },
                ),
            ],
            tables: vec![RawTable {
                at: Addr::Table(0),
                entries: vec![
                    RawDesc {
                        addr: at(1, 3),
                        len: Len::Pages(1),
                        flags: 3,
                        next: 1,
                    },
                    RawDesc {
                        addr: at(1, 3),
                        len: Len::Pages(1),
                        flags: 2,
                        next: 0,
                    },
                ],
            }],
            cmds: vec![(Addr::Slot(4), CmdChoice::Next)],
        }),
        hd::Op::PostProcess(hd::Chain::Raw {
            head: 0x8001,
            writes: vec![],
            tables: vec![],
            cmds: vec![],
        }),
        hd::Op::AvailIdx(2),
        hd::Op::Process,
        hd::Op::Setup(vec![]),
        hd::Op::Reset,
        hd::Op::Setup(vec![hd::Chain::Good {
            start: 0,
            cmd: Some(hd::CmdSpec {
                value: CmdChoice::Current,
                slot: 5,
                shape: hd::CmdShape::Whole,
            }),
            hints: vec![],
            indirect: None,
            hints_first: false,
        }]),
        hd::Op::StopRound,
    ]);
    vec![
        ("linux-rounds", linux),
        ("element-shapes", shapes),
        ("raw-chains", raw),
    ]
}

/// A well-formed element with `payload` and writable buffers `writable`.
fn good(payload: bd::Payload, writable: Vec<(Addr, Len)>) -> bd::Element {
    bd::Element::Good(bd::Good {
        payload,
        tail: 0,
        cuts: vec![],
        writable,
        writable_first: false,
        at: None,
        indirect: None,
    })
}

/// A bring-up accepting every offered feature with the largest queues.
fn bring_up(prepost: Vec<(u8, bd::Element)>) -> bd::SetupSpec {
    bd::SetupSpec {
        features: u64::MAX,
        sizes: [0; bd::QUEUES],
        skip: 0,
        poison: None,
        actual: None,
        prepost,
        place: vec![],
    }
}

/// The input of `balloon_device` over two regions (the rings in the first), with 4 KiB host
/// pages, brought up with every feature, then `ops`.
fn device_input(ops: Vec<bd::Op>) -> bd::Input {
    bd::Input {
        placement: Placement::Low(16),
        regions: vec![
            bd::MappedRegionSpec {
                region: region(0, 31),
                host_shift: 0,
            },
            bd::MappedRegionSpec {
                region: region(2, 63),
                host_shift: 3,
            },
        ],
        ring_region: 0,
        host_page: bd::HostPage::Small,
        queue_size_log: 3,
        fpq_size_log: 3,
        budget: 0,
        setup: Some(bring_up(vec![])),
        ops,
    }
}

/// PFNs of pages `first..first + count` of region 1.
fn pfns(first: u8, count: u8) -> bd::Payload {
    bd::Payload::Pfns(vec![bd::Pfn::Run {
        region: 1,
        page: first,
        count,
    }])
}

/// The seeds of `balloon_device`.
pub fn balloon_device() -> Vec<(&'static str, bd::Input)> {
    let balloon = device_input(vec![
        bd::Op::SetTarget(8),
        bd::Op::PostProcess {
            queue: 0,
            element: good(pfns(4, 8), vec![]),
        },
        bd::Op::Actual(8),
        bd::Op::Inhibit(false),
        bd::Op::Flush,
        bd::Op::SetTargetBytes(4 * 4096),
        bd::Op::PostProcess {
            queue: 1,
            element: good(pfns(4, 4), vec![]),
        },
        bd::Op::Actual(4),
        bd::Op::PostProcess {
            queue: 0,
            element: good(
                bd::Payload::Pfns(vec![
                    bd::Pfn::Ram {
                        region: 0,
                        page: 20,
                    },
                    bd::Pfn::Edge {
                        region: 1,
                        end: true,
                        delta: -1,
                    },
                    bd::Pfn::Huge(3),
                    bd::Pfn::Raw(u32::MAX),
                ]),
                vec![],
            ),
        },
        bd::Op::Flush,
    ]);
    let stats = device_input(vec![
        bd::Op::StatsInterval(true),
        bd::Op::PostProcess {
            queue: 2,
            element: good(
                bd::Payload::Stats(vec![(0, 1), (4, 1 << 30), (5, 1 << 29), (0x8000, 7)]),
                vec![],
            ),
        },
        bd::Op::RequestStats,
        bd::Op::PostProcess {
            queue: 2,
            element: good(bd::Payload::Stats(vec![(2, 3)]), vec![]),
        },
        bd::Op::StatsInterval(false),
        bd::Op::ConfigRead {
            offset: 0,
            raw: None,
            len: 8,
        },
        bd::Op::ConfigWrite {
            offset: 4,
            raw: None,
            data: [3, 0, 0, 0, 0, 0, 0, 0],
            len: 4,
        },
        bd::Op::MmioRead {
            reg: bd::Reg::Known(0),
            width: 4,
        },
        bd::Op::MmioWrite {
            reg: bd::Reg::Config(8),
            value: 0xff,
            width: 1,
        },
    ]);
    let hints = device_input(vec![
        bd::Op::StartRound,
        bd::Op::LinuxRound {
            hints: vec![
                vec![(at(1, 10), Len::Pages(2))],
                vec![(at(1, 20), Len::Pages(1)), (at(0, 30), Len::Pages(1))],
            ],
            stop: true,
        },
        bd::Op::Done,
        bd::Op::PostProcess {
            queue: 4,
            element: good(bd::Payload::None, vec![(at(1, 40), Len::Pages(4))]),
        },
        bd::Op::Flush,
    ]);
    let snapshot = device_input(vec![
        bd::Op::PostProcess {
            queue: 0,
            element: good(pfns(1, 2), vec![]),
        },
        bd::Op::SaveRestore {
            pause: true,
            corrupt: vec![],
        },
        bd::Op::Resume,
        bd::Op::SaveRestore {
            pause: false,
            corrupt: vec![
                bd::Corruption::NumPages(7),
                bd::Corruption::Queue {
                    index: 0,
                    field: bd::QueueField::Size(3),
                },
            ],
        },
        bd::Op::ResetSetup(bd::SetupSpec {
            features: 0,
            sizes: [1, 2, 0, 1, 2],
            skip: 0x80 | 0x04,
            poison: Some(0xaa),
            actual: Some(2),
            prepost: vec![(0, good(pfns(3, 1), vec![]))],
            place: vec![],
        }),
        bd::Op::Process(0),
        bd::Op::Reset,
        bd::Op::Setup(bring_up(vec![])),
    ]);
    let raw = device_input(vec![
        bd::Op::GuestWrite {
            at: Addr::Slot(9),
            bytes: vec![5, 0, 0, 0],
        },
        bd::Op::PostProcess {
            queue: 0,
            element: bd::Element::Raw {
                head: 0,
                writes: vec![
                    (
                        0,
                        RawDesc {
                            addr: Addr::Table(1),
                            len: Len::Raw(16),
                            flags: 4,
                            next: 0,
                        },
                    ),
                    (
                        1,
                        RawDesc {
                            addr: Addr::Slot(9),
                            len: Len::Raw(4),
                            flags: 1,
                            next: 1,
                        },
                    ),
                ],
                tables: vec![RawTable {
                    at: Addr::Table(1),
                    entries: vec![RawDesc {
                        addr: Addr::Slot(9),
                        len: Len::Raw(4),
                        flags: 0,
                        next: 0,
                    }],
                }],
                bytes: vec![(Addr::Slot(10), [1, 0, 0, 0, 2, 0, 0, 0])],
            },
        },
        bd::Op::Post {
            queue: 1,
            element: bd::Element::Raw {
                head: 1,
                writes: vec![],
                tables: vec![],
                bytes: vec![],
            },
        },
        bd::Op::AvailIdx { queue: 1, idx: 9 },
        bd::Op::Process(1),
        bd::Op::PostProcess {
            queue: 0,
            element: bd::Element::Good(bd::Good {
                payload: pfns(0, 3),
                tail: 3,
                cuts: vec![2, 6],
                writable: vec![],
                writable_first: false,
                at: None,
                indirect: Some(0),
            }),
        },
    ]);
    vec![
        ("inflate-deflate", balloon),
        ("stats-config-mmio", stats),
        ("hints-reporting", hints),
        ("snapshot-restore", snapshot),
        ("raw-chains", raw),
    ]
}

#[cfg(test)]
mod tests {
    use std::fmt::Debug;
    use std::fs;
    use std::path::PathBuf;

    use arbitrary::{Arbitrary, Unstructured};

    use super::*;
    use crate::input::encode::{encode_variant, to_bytes, Encode};

    /// Decodes `bytes` the way `fuzz_target!` does.
    fn decode<T: for<'a> Arbitrary<'a>>(bytes: &[u8]) -> T {
        assert!(
            bytes.len() >= T::size_hint(0).0,
            "shorter than the target's minimum"
        );
        T::arbitrary_take_rest(Unstructured::new(bytes)).expect("decodes")
    }

    /// Each variant of `T` encodes with the index `arbitrary` decodes it from: decode the
    /// choice of variant `i` (fields all zero), encode the result, compare.
    fn check_variants<T: for<'a> Arbitrary<'a> + Encode + PartialEq + Debug>() {
        let count = T::variants();
        assert!(count > 1, "{} is not an enum", std::any::type_name::<T>());
        for i in 0..count {
            let mut bytes = Vec::new();
            encode_variant(i, count, &mut bytes);
            bytes.extend_from_slice(&[0; 64]);
            let value: T = decode(&bytes);
            let encoded = to_bytes(&value);
            assert_eq!(
                encoded[..4],
                bytes[..4],
                "{value:?}: variant {i} of {count}"
            );
            assert_eq!(decode::<T>(&encoded), value);
        }
    }

    #[test]
    fn enums_encode_their_variants_in_order() {
        check_variants::<crate::layout::Placement>();
        check_variants::<crate::layout::Addr>();
        check_variants::<crate::layout::Len>();
        check_variants::<CmdChoice>();
        check_variants::<bo::Placement>();
        check_variants::<bo::Op>();
        check_variants::<hd::CmdShape>();
        check_variants::<hd::Chain>();
        check_variants::<hd::Op>();
        check_variants::<bd::HostPage>();
        check_variants::<bd::Pfn>();
        check_variants::<bd::Payload>();
        check_variants::<bd::Element>();
        check_variants::<bd::Reg>();
        check_variants::<bd::QueueField>();
        check_variants::<bd::Corruption>();
        check_variants::<bd::Op>();
    }

    /// Encodes each seed, checks it decodes back to itself, runs the decoded input and
    /// writes the bytes to `corpus/<target>/<name>`.
    fn write_seeds<T: for<'a> Arbitrary<'a> + Encode + PartialEq + Debug, R>(
        target: &str,
        seeds: Vec<(&str, T)>,
        run: impl Fn(&T) -> R,
    ) -> Vec<(String, R)> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("corpus")
            .join(target);
        fs::create_dir_all(&dir).expect("corpus directory");
        assert!(!seeds.is_empty());
        let mut out = Vec::new();
        for (name, seed) in seeds {
            let bytes = to_bytes(&seed);
            let decoded: T = decode(&bytes);
            assert_eq!(decoded, seed, "{target}/{name} does not round-trip");
            out.push((name.to_string(), run(&decoded)));
            fs::write(dir.join(name), &bytes).expect("corpus file");
        }
        out
    }

    #[test]
    fn bitmap_offset_seeds() {
        write_seeds("bitmap_offset", bitmap_offset(), crate::bitmap_offset::run);
    }

    #[test]
    fn hint_desc_seeds() {
        let out = write_seeds("hint_desc", hint_desc(), crate::hint_desc::run);
        // What each seed reaches, so that a change of format or harness that makes a seed
        // pointless shows.
        for (name, m) in &out {
            match name.as_str() {
                "linux-rounds" => {
                    assert_eq!(
                        (m.rounds_started, m.hints_accepted),
                        (2, 6),
                        "{name}: {m:?}"
                    )
                }
                "element-shapes" => assert!(
                    m.hints_accepted >= 2 && m.malformed_elements >= 1 && m.hints_misaligned >= 1,
                    "{name}: {m:?}"
                ),
                "raw-chains" => assert!(
                    m.hints_accepted >= 1 && m.hints_wrong_state >= 1 && m.drained >= 1,
                    "{name}: {m:?}"
                ),
                _ => panic!("no expectation for {name}"),
            }
        }
    }

    #[test]
    fn balloon_device_seeds() {
        let out = write_seeds(
            "balloon_device",
            balloon_device(),
            crate::balloon_device::run,
        );
        for (name, m) in &out {
            let p = &m.pages;
            let reached = match name.as_str() {
                "inflate-deflate" => {
                    p.discard_calls > 0
                        && p.populate_calls > 0
                        && p.deflated_pages > 0
                        && p.pfns_outside_ram > 0
                }
                "stats-config-mmio" => m.stats_updates >= 2 && m.stats_requests == 1,
                "hints-reporting" => {
                    m.hint.hints_accepted >= 3 && p.reporting_elements == 1 && p.reported_bytes > 0
                }
                "snapshot-restore" => p.inflated_pages > 0 && p.discard_calls > 0,
                "raw-chains" => p.inflate_elements >= 2 && p.pfns_outside_ram > 0,
                _ => panic!("no expectation for {name}"),
            };
            assert!(reached, "{name}: {m:?}");
        }
    }
}
