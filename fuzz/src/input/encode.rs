// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The inverse of the input formats: [`Encode`] writes a value as the bytes `arbitrary` 1.x
//! decodes back into it (with `Input::arbitrary_take_rest`, as `fuzz_target!` does), so that
//! tests can write seed corpora from typed inputs.
//!
//! What `arbitrary` 1.x reads: an integer takes its width in little-endian bytes (`usize`
//! takes 8); a `bool` one byte (`b & 1 == 1`); an `Option` a `bool`, then the value; a `Vec`
//! a `bool` before each element (1: another element, 0: the end), also as the last field of
//! a struct; arrays and tuples their elements in order; a struct its fields in order; an
//! enum a `u32` `x` choosing variant `(x * count) >> 32`, then the variant's fields. The
//! tests in `corpus` check that each type decodes what it encodes.

/// Writes a value in the byte format `arbitrary` decodes it from.
pub trait Encode {
    /// Appends the bytes of `self` to `out`.
    fn encode(&self, out: &mut Vec<u8>);

    /// The number of variants (1 for a type that is not an enum).
    fn variants() -> usize
    where
        Self: Sized,
    {
        1
    }
}

/// The bytes of `value`.
pub fn to_bytes<T: Encode>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    value.encode(&mut out);
    out
}

/// Writes the choice of variant `index` of `count`: the smallest `u32` `x` with
/// `(x * count) >> 32 == index`.
pub fn encode_variant(index: usize, count: usize, out: &mut Vec<u8>) {
    let (index, count) = (index as u64, count as u64);
    let x = (index << 32).div_ceil(count);
    // `index < count`, so `x <= u32::MAX`.
    out.extend_from_slice(&(x as u32).to_le_bytes());
}

macro_rules! encode_int {
    ($($t:ty),*) => {
        $(impl Encode for $t {
            fn encode(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        })*
    };
}

encode_int!(u8, u16, u32, u64, i8, i16, i32, i64);

impl Encode for usize {
    fn encode(&self, out: &mut Vec<u8>) {
        (*self as u64).encode(out);
    }
}

impl Encode for bool {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
}

impl<T: Encode> Encode for Option<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        self.is_some().encode(out);
        if let Some(v) = self {
            v.encode(out);
        }
    }
}

impl<T: Encode> Encode for Vec<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        for v in self {
            true.encode(out);
            v.encode(out);
        }
        false.encode(out);
    }
}

impl<T: Encode, const N: usize> Encode for [T; N] {
    fn encode(&self, out: &mut Vec<u8>) {
        for v in self {
            v.encode(out);
        }
    }
}

macro_rules! encode_tuple {
    ($($name:ident),*) => {
        impl<$($name: Encode),*> Encode for ($($name,)*) {
            #[allow(non_snake_case)]
            fn encode(&self, out: &mut Vec<u8>) {
                let ($($name,)*) = self;
                $($name.encode(out);)*
            }
        }
    };
}

encode_tuple!(A, B);
encode_tuple!(A, B, C);
encode_tuple!(A, B, C, D);

/// `Encode` for a struct: its fields, all of them, in their declaration order.
macro_rules! encode_struct {
    ($t:path { $($f:ident),* $(,)? }) => {
        impl Encode for $t {
            fn encode(&self, out: &mut Vec<u8>) {
                let Self { $($f),* } = self;
                $($f.encode(out);)*
            }
        }
    };
}

/// `Encode` for an enum: its variants, all of them, in their declaration order (the tests
/// check the order), each with its fields.
macro_rules! encode_enum {
    ($t:path { $($v:ident $(( $($p:ident),* ))? $({ $($f:ident),* })?),* $(,)? }) => {
        impl Encode for $t {
            fn encode(&self, out: &mut Vec<u8>) {
                const NAMES: &[&str] = &[$(stringify!($v)),*];
                let index = |name: &str| NAMES.iter().position(|n| *n == name).unwrap_or(0);
                match self {
                    $(Self::$v $(( $($p),* ))? $({ $($f),* })? => {
                        encode_variant(index(stringify!($v)), NAMES.len(), out);
                        $($($p.encode(out);)*)?
                        $($($f.encode(out);)*)?
                    })*
                }
            }

            fn variants() -> usize {
                [$(stringify!($v)),*].len()
            }
        }
    };
}

// `crate::layout`.

encode_struct!(crate::layout::RegionSpec {
    gap_pages,
    pages,
    trim,
    skew
});
encode_enum!(crate::layout::Placement {
    Low(x0),
    At(x0),
    Top(x0),
});
encode_enum!(crate::layout::Addr {
    Region { region, page, offset },
    End { region, back },
    Slot(x0),
    Table(x0),
    Scratch(x0),
    Raw(x0),
});
encode_enum!(crate::layout::Len {
    Pages(x0),
    Jitter { pages, delta },
    Huge(x0),
    Raw(x0),
});

// `crate::hint`.

encode_enum!(crate::hint::CmdChoice {
    Current,
    Previous,
    Next,
    Stop,
    Done,
    Raw(x0),
});

// `crate::desc`.

encode_struct!(crate::desc::RawDesc {
    addr,
    len,
    flags,
    next
});
encode_struct!(crate::desc::RawTable { at, entries });

// `crate::input::bitmap_offset`.

encode_struct!(crate::input::bitmap_offset::Region { gap_pages, len });
encode_enum!(crate::input::bitmap_offset::Placement {
    At(x0),
    EndAtTop,
});
encode_enum!(crate::input::bitmap_offset::Op {
    RawHint { gpa, len },
    NearHint { region, page, jitter, pages, len_jitter },
    Mark { region, page, len },
    Send { region, page },
    MarkAll,
    Sync { page_size, words },
});
encode_struct!(crate::input::bitmap_offset::Input {
    words,
    queries,
    raw_queries,
    placement,
    regions,
    ops
});

// `crate::input::hint_desc`.

encode_enum!(crate::input::hint_desc::CmdShape {
    Whole,
    Split(x0),
    Long(x0),
    Short(x0),
    ZeroFirst,
    At(x0),
});
encode_struct!(crate::input::hint_desc::CmdSpec { value, slot, shape });
encode_struct!(crate::input::hint_desc::HintSpec { addr, len });
encode_enum!(crate::input::hint_desc::Chain {
    Good { start, cmd, hints, indirect, hints_first },
    Raw { head, writes, tables, cmds },
});
encode_enum!(crate::input::hint_desc::Op {
    Post(x0),
    Process,
    PostProcess(x0),
    StartRound,
    StopRound,
    Done,
    Reset,
    Setup(x0),
    ResetSetup,
    Pause,
    Resume,
    WriteCmd { slot, value },
    LinuxRound { hints, indirect, stop },
    AvailIdx(x0),
});
encode_struct!(crate::input::hint_desc::Input {
    placement,
    regions,
    ring_region,
    max_size_log,
    size_shift,
    stats,
    page_poison,
    reporting,
    event_idx,
    indirect_desc,
    ack_poison,
    ops
});

// `crate::input::balloon_device`.

encode_struct!(crate::input::balloon_device::MappedRegionSpec { region, host_shift });
encode_enum!(crate::input::balloon_device::HostPage {
    Small,
    Medium,
    Huge,
});
encode_enum!(crate::input::balloon_device::Pfn {
    Ram { region, page },
    Run { region, page, count },
    Edge { region, end, delta },
    Huge(x0),
    Raw(x0),
});
encode_enum!(crate::input::balloon_device::Payload {
    None,
    Pfns(x0),
    Stats(x0),
    Cmd(x0),
    Bytes(x0),
});
encode_struct!(crate::input::balloon_device::Good {
    payload,
    tail,
    cuts,
    writable,
    writable_first,
    at,
    indirect
});
encode_enum!(crate::input::balloon_device::Element {
    Good(x0),
    Raw { head, writes, tables, bytes },
});
encode_struct!(crate::input::balloon_device::SetupSpec {
    features,
    sizes,
    skip,
    poison,
    actual,
    prepost,
    place
});
encode_enum!(crate::input::balloon_device::Reg {
    Known(x0),
    Raw(x0),
    Config(x0),
});
encode_enum!(crate::input::balloon_device::QueueField {
    MaxSize(x0),
    Size(x0),
    Ready,
    Desc(x0),
    Avail(x0),
    Used(x0),
    NextAvail(x0),
    NextUsed(x0),
    EventIdx,
});
encode_enum!(crate::input::balloon_device::Corruption {
    Acked(x0),
    Activated,
    NumPages(x0),
    Actual(x0),
    Poison(x0),
    Queue { index, field },
    DropQueue,
    CmdId(x0),
    HintState(x0),
    StatsHeld(x0),
    Inhibited,
    DeviceFeatures(x0),
    MmioStatus(x0),
});
encode_enum!(crate::input::balloon_device::Op {
    MmioWrite { reg, value, width },
    MmioRead { reg, width },
    ConfigWrite { offset, raw, data, len },
    ConfigRead { offset, raw, len },
    Post { queue, element },
    Process(x0),
    PostProcess { queue, element },
    AvailIdx { queue, idx },
    SetTarget(x0),
    SetTargetBytes(x0),
    Actual(x0),
    RequestStats,
    StatsInterval(x0),
    Inhibit(x0),
    Flush,
    Pause,
    Resume,
    Reset,
    Setup(x0),
    ResetSetup(x0),
    SaveRestore { pause, corrupt },
    StartRound,
    StopRound,
    Done,
    LinuxRound { hints, stop },
    GuestWrite { at, bytes },
});
encode_struct!(crate::input::balloon_device::Input {
    placement,
    regions,
    ring_region,
    host_page,
    queue_size_log,
    fpq_size_log,
    budget,
    setup,
    ops
});
