// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The command line.
//!
//! Every [`BalloonConfig`] field has an option. Booleans come in pairs, `--X` and `--no-X`
//! (the last one wins). Defaults offer everything the Linux driver can use, and accept hints
//! into file-backed memory, since vhost-user guest memory is always a shared file.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use log::LevelFilter;
use virtio_balloon::defs::queue;
use virtio_balloon::BalloonConfig;

use crate::discard::DiscardMode;

/// The longest statistics polling interval accepted (one day).
pub const MAX_STATS_INTERVAL_SECS: u64 = 86_400;

/// Where free page hints go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HintSinkKind {
    /// Count hints and bytes per round.
    Count,
    /// Count, and capture the free page queue's elements for `--capture`.
    Capture,
}

/// How inflated and reported pages are discarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DiscardArg {
    /// By what backs each memory region: punch holes in shared files and memfds (whole huge
    /// pages on hugetlbfs), `MADV_DONTNEED` for private memory, nothing where the backing
    /// cannot be told.
    Auto,
    /// Override: punch a hole in every region's file (not one mapped privately), then
    /// `MADV_DONTNEED`.
    PunchHole,
    /// Override: `MADV_DONTNEED` only (frees nothing of a shared file).
    Madvise,
    /// Leave memory alone.
    None,
}

impl From<DiscardArg> for DiscardMode {
    fn from(d: DiscardArg) -> Self {
        match d {
            DiscardArg::Auto => DiscardMode::Auto,
            DiscardArg::PunchHole => DiscardMode::PunchHole,
            DiscardArg::Madvise => DiscardMode::Madvise,
            DiscardArg::None => DiscardMode::None,
        }
    }
}

fn parse_level(s: &str) -> Result<LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("{s:?} is not one of off, error, warn, info, debug, trace"))
}

/// The daemon's command line.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "vhost-user-balloon",
    version,
    about = "A vhost-user daemon serving the virtio-balloon device (free page hinting for \
             live migration), with a JSON control socket"
)]
pub struct Options {
    /// The vhost-user socket the daemon listens on.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,

    /// The control socket (one JSON request per line).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// The largest queue size offered; frontends choose each queue's size up to it.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub queue_size: u16,

    /// The largest free page queue size (default: --queue-size).
    #[arg(long, value_name = "N")]
    pub free_page_queue_size: Option<u16>,

    /// The largest reporting queue size (default: --queue-size; at least 32).
    #[arg(long, value_name = "N")]
    pub reporting_queue_size: Option<u16>,

    /// The most chains handled per wakeup of one queue.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub chains_per_wakeup: u16,

    /// Poll the driver's statistics every SECS seconds (0: only on request).
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pub stats_interval: u64,

    /// Where free page hints go.
    #[arg(long, value_enum, default_value_t = HintSinkKind::Count)]
    pub hint_sink: HintSinkKind,

    /// The capture file (with --hint-sink capture).
    #[arg(long, value_name = "PATH")]
    pub capture: Option<PathBuf>,

    /// How inflated and reported pages are discarded: by what backs each memory region
    /// (auto), or one way for every region.
    #[arg(long, value_enum, default_value_t = DiscardArg::Auto)]
    pub discard: DiscardArg,

    /// The log level: off, error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL", default_value = "info", value_parser = parse_level)]
    pub log_level: LevelFilter,

    /// Offer VIRTIO_BALLOON_F_MUST_TELL_HOST (default).
    #[arg(long, overrides_with = "no_must_tell_host")]
    must_tell_host: bool,
    /// Do not offer VIRTIO_BALLOON_F_MUST_TELL_HOST.
    #[arg(long, overrides_with = "must_tell_host")]
    no_must_tell_host: bool,

    /// Offer the statistics queue (default).
    #[arg(long, overrides_with = "no_stats")]
    stats: bool,
    /// Do not offer the statistics queue.
    #[arg(long, overrides_with = "stats")]
    no_stats: bool,

    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM (default).
    #[arg(long, overrides_with = "no_deflate_on_oom")]
    deflate_on_oom: bool,
    /// Do not offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
    #[arg(long, overrides_with = "deflate_on_oom")]
    no_deflate_on_oom: bool,

    /// Offer free page hinting (default).
    #[arg(long, overrides_with = "no_free_page_hint")]
    free_page_hint: bool,
    /// Do not offer free page hinting.
    #[arg(long, overrides_with = "free_page_hint")]
    no_free_page_hint: bool,

    /// Offer VIRTIO_BALLOON_F_PAGE_POISON (default).
    #[arg(long, overrides_with = "no_page_poison")]
    page_poison: bool,
    /// Do not offer VIRTIO_BALLOON_F_PAGE_POISON.
    #[arg(long, overrides_with = "page_poison")]
    no_page_poison: bool,

    /// Offer free page reporting (default).
    #[arg(long, overrides_with = "no_reporting")]
    reporting: bool,
    /// Do not offer free page reporting.
    #[arg(long, overrides_with = "reporting")]
    no_reporting: bool,

    /// Accept hints into file-backed memory (default: vhost-user memory is always a file).
    #[arg(long, overrides_with = "no_hint_file_backed_memory")]
    hint_file_backed_memory: bool,
    /// Ignore hints into file-backed memory.
    #[arg(long, overrides_with = "hint_file_backed_memory")]
    no_hint_file_backed_memory: bool,
}

/// A `--X`/`--no-X` pair whose default is on: off only if `--no-X` came last (clap clears
/// the other flag of the pair when one is given).
fn pair(on: bool, off: bool) -> bool {
    on || !off
}

fn check_size(name: &str, size: u16, min: u16) -> Result<(), String> {
    if size == 0 || !size.is_power_of_two() || size > queue::MAX_SIZE {
        return Err(format!(
            "{name} {size} is not a power of two in 1..={}",
            queue::MAX_SIZE
        ));
    }
    if size < min {
        return Err(format!("{name} {size} is below {min}"));
    }
    Ok(())
}

impl Options {
    /// The device configuration the options ask for.
    pub fn balloon_config(&self) -> BalloonConfig {
        BalloonConfig::default()
            .with_must_tell_host(pair(self.must_tell_host, self.no_must_tell_host))
            .with_stats(pair(self.stats, self.no_stats))
            .with_deflate_on_oom(pair(self.deflate_on_oom, self.no_deflate_on_oom))
            .with_free_page_hint(pair(self.free_page_hint, self.no_free_page_hint))
            .with_page_poison(pair(self.page_poison, self.no_page_poison))
            .with_reporting(pair(self.reporting, self.no_reporting))
            .with_queue_size(self.queue_size)
            .with_free_page_queue_size(self.free_page_queue_size.unwrap_or(self.queue_size))
            .with_reporting_queue_size(self.reporting_queue_size.unwrap_or(self.queue_size))
            .with_chains_per_wakeup(self.chains_per_wakeup)
            .with_hint_file_backed_memory(pair(
                self.hint_file_backed_memory,
                self.no_hint_file_backed_memory,
            ))
            .with_stall_timeout(None)
    }

    /// The largest queue size to report to the frontend (`VhostUserBackend::max_queue_size`).
    pub fn max_queue_size(&self) -> u16 {
        self.queue_size
    }

    /// The statistics polling interval (zero: off).
    pub fn stats_interval(&self) -> Duration {
        Duration::from_secs(self.stats_interval)
    }

    /// The discard mode.
    pub fn discard_mode(&self) -> DiscardMode {
        self.discard.into()
    }

    /// The capture file, if hints are captured.
    pub fn capture_path(&self) -> Option<&PathBuf> {
        match self.hint_sink {
            HintSinkKind::Capture => self.capture.as_ref(),
            HintSinkKind::Count => None,
        }
    }

    /// Checks the options against each other and the device's limits.
    pub fn validate(&self) -> Result<(), String> {
        let cfg = self.balloon_config();
        check_size("--queue-size", cfg.queue_size, 1)?;
        if cfg.free_page_hint {
            check_size(
                "--free-page-queue-size",
                cfg.free_page_queue_size,
                queue::MIN_FREE_PAGE_SIZE,
            )?;
        }
        if cfg.reporting {
            check_size(
                "--reporting-queue-size",
                cfg.reporting_queue_size,
                queue::MIN_REPORTING_SIZE,
            )
            .map_err(|e| format!("{e} (free page reporting needs 32; or --no-reporting)"))?;
        }
        for (name, size) in [
            ("--free-page-queue-size", self.free_page_queue_size),
            ("--reporting-queue-size", self.reporting_queue_size),
        ] {
            if let Some(s) = size.filter(|&s| s > self.queue_size) {
                return Err(format!(
                    "{name} {s} is above --queue-size {} (the largest size offered)",
                    self.queue_size
                ));
            }
        }
        if cfg.chains_per_wakeup == 0 {
            return Err("--chains-per-wakeup must be at least 1".into());
        }
        if self.stats_interval > MAX_STATS_INTERVAL_SECS {
            return Err(format!(
                "--stats-interval is above {MAX_STATS_INTERVAL_SECS} seconds"
            ));
        }
        if self.stats_interval > 0 && !cfg.stats {
            return Err("--stats-interval needs the statistics queue (drop --no-stats)".into());
        }
        match (self.hint_sink, &self.capture) {
            (HintSinkKind::Capture, None) => {
                return Err("--hint-sink capture needs --capture PATH".into())
            }
            (HintSinkKind::Count, Some(_)) => {
                return Err("--capture needs --hint-sink capture".into())
            }
            _ => {}
        }
        if self.hint_sink == HintSinkKind::Capture && !cfg.free_page_hint {
            return Err(
                "--hint-sink capture needs free page hinting (drop --no-free-page-hint)".into(),
            );
        }
        if self.socket.as_os_str().is_empty() {
            return Err("--socket must not be empty".into());
        }
        if self.control.as_ref() == Some(&self.socket) {
            return Err("--control and --socket must be different paths".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options, String> {
        let o = Options::try_parse_from(
            std::iter::once("vhost-user-balloon").chain(args.iter().copied()),
        )
        .map_err(|e| e.to_string())?;
        o.validate()?;
        Ok(o)
    }

    #[test]
    fn defaults() {
        let o = parse(&["--socket", "/tmp/b.sock"]).unwrap();
        assert_eq!(o.socket, PathBuf::from("/tmp/b.sock"));
        assert_eq!(o.control, None);
        assert_eq!(o.log_level, LevelFilter::Info);
        // By what backs each region (it was punch-hole before regions were classified).
        assert_eq!(o.discard_mode(), DiscardMode::Auto);
        assert_eq!(o.hint_sink, HintSinkKind::Count);
        assert_eq!(o.capture_path(), None);
        assert_eq!(o.stats_interval(), Duration::ZERO);
        assert_eq!(o.max_queue_size(), 256);
        let c = o.balloon_config();
        assert_eq!(
            c,
            BalloonConfig::default()
                .with_must_tell_host(true)
                .with_stats(true)
                .with_deflate_on_oom(true)
                .with_free_page_hint(true)
                .with_page_poison(true)
                .with_reporting(true)
                .with_queue_size(256)
                .with_free_page_queue_size(256)
                .with_reporting_queue_size(256)
                .with_chains_per_wakeup(256)
                .with_hint_file_backed_memory(true)
                .with_stall_timeout(None)
        );
    }

    #[test]
    fn typical_command_lines() {
        let o = parse(&[
            "--socket=/run/b.sock",
            "--control",
            "/run/b.ctl",
            "--queue-size",
            "1024",
            "--stats-interval",
            "5",
            "--hint-sink",
            "capture",
            "--capture",
            "/tmp/round.txt",
            "--discard",
            "madvise",
            "--log-level",
            "debug",
        ])
        .unwrap();
        assert_eq!(o.control, Some(PathBuf::from("/run/b.ctl")));
        assert_eq!(o.stats_interval(), Duration::from_secs(5));
        assert_eq!(o.capture_path(), Some(&PathBuf::from("/tmp/round.txt")));
        assert_eq!(o.discard_mode(), DiscardMode::Madvise);
        assert_eq!(o.log_level, LevelFilter::Debug);
        assert_eq!(o.balloon_config().free_page_queue_size, 1024);

        let o = parse(&[
            "--socket",
            "s",
            "--no-reporting",
            "--no-deflate-on-oom",
            "--no-page-poison",
            "--no-hint-file-backed-memory",
            "--queue-size",
            "16",
            "--free-page-queue-size",
            "2",
            "--chains-per-wakeup",
            "8",
            "--discard",
            "none",
        ])
        .unwrap();
        let c = o.balloon_config();
        assert!(!c.reporting && !c.deflate_on_oom && !c.page_poison);
        assert!(!c.hint_file_backed_memory);
        assert!(c.stats && c.free_page_hint && c.must_tell_host);
        assert_eq!((c.queue_size, c.free_page_queue_size), (16, 2));
        assert_eq!(c.chains_per_wakeup, 8);
        assert_eq!(o.discard_mode(), DiscardMode::None);
    }

    #[test]
    fn every_discard_mode_has_its_option() {
        for (arg, mode) in [
            ("auto", DiscardMode::Auto),
            ("punch-hole", DiscardMode::PunchHole),
            ("madvise", DiscardMode::Madvise),
            ("none", DiscardMode::None),
        ] {
            let o = parse(&["--socket", "s", "--discard", arg]).unwrap();
            assert_eq!(o.discard_mode(), mode, "{arg}");
        }
    }

    #[test]
    fn last_of_a_pair_wins() {
        let o = parse(&["--socket", "s", "--no-stats", "--stats"]).unwrap();
        assert!(o.balloon_config().stats);
        let o = parse(&["--socket", "s", "--stats", "--no-stats"]).unwrap();
        assert!(!o.balloon_config().stats);
        let o = parse(&[
            "--socket",
            "s",
            "--no-free-page-hint",
            "--no-must-tell-host",
            "--must-tell-host",
        ])
        .unwrap();
        assert!(!o.balloon_config().free_page_hint);
        assert!(o.balloon_config().must_tell_host);
    }

    #[test]
    fn bad_command_lines() {
        for (args, needle) in [
            (&[][..], "--socket"),
            (&["--socket", "s", "--queue-size", "100"], "power of two"),
            (&["--socket", "s", "--queue-size", "65536"], "65536"),
            (&["--socket", "s", "--queue-size", "0"], "power of two"),
            (&["--socket", "s", "--queue-size", "16"], "reporting"),
            (
                &["--socket", "s", "--free-page-queue-size", "512"],
                "above --queue-size",
            ),
            (&["--socket", "s", "--chains-per-wakeup", "0"], "at least 1"),
            (&["--socket", "s", "--stats-interval", "-1"], "-1"),
            (&["--socket", "s", "--stats-interval", "86401"], "86400"),
            (
                &["--socket", "s", "--no-stats", "--stats-interval", "1"],
                "statistics queue",
            ),
            (&["--socket", "s", "--hint-sink", "capture"], "--capture"),
            (&["--socket", "s", "--capture", "x"], "--hint-sink capture"),
            (&["--socket", "s", "--hint-sink", "bitmap"], "bitmap"),
            (&["--socket", "s", "--discard", "shred"], "shred"),
            (&["--socket", "s", "--log-level", "loud"], "loud"),
            (&["--socket", "s", "--control", "s"], "different"),
            (&["--socket", "s", "--stats=false"], "unexpected value"),
            (&["--socket", "s", "--frobnicate"], "frobnicate"),
        ] {
            let e = parse(args).map(|_| ()).unwrap_err();
            assert!(
                e.contains(needle),
                "{args:?}: {e:?} should mention {needle:?}"
            );
        }
    }
}
