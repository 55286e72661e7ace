// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `vhost-user-balloon`: serves the virtio balloon to a vhost-user frontend.
//!
//! ```text
//! vhost-user-balloon --socket /run/balloon.sock --control /run/balloon.ctl
//! ```
//!
//! `--help` lists every flag. The control socket speaks one JSON object per line (see the
//! README).

use std::os::unix::net::UnixListener;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use log::{error, info};
use vhost_user_balloon::capture::{HintCounter, DEFAULT_MAX_ELEMENTS};
use vhost_user_balloon::control::{self, BalloonController, CaptureTarget};
use vhost_user_balloon::copy::{Copier, CopySink};
use vhost_user_balloon::daemon::{bind, empty_memory, Daemon, DaemonController};
use vhost_user_balloon::device::lock;
use vhost_user_balloon::discard::TrackingBackend;
use vhost_user_balloon::options::Options;

/// Log lines on standard error, with the seconds since start.
struct StderrLog {
    start: Instant,
}

impl log::Log for StderrLog {
    fn enabled(&self, meta: &log::Metadata<'_>) -> bool {
        meta.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!(
                "[{:9.3} {:5}] {}",
                self.start.elapsed().as_secs_f64(),
                record.level(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

fn run(opts: Options) -> Result<(), String> {
    opts.validate()?;
    // A frontend that shrinks its memory file must not kill the daemon.
    vhost_user_balloon::guard::install()
        .map_err(|e| format!("cannot install the SIGBUS guard: {e}"))?;
    let counter = Arc::new(match opts.capture_path() {
        Some(_) => HintCounter::capturing(DEFAULT_MAX_ELEMENTS),
        None => HintCounter::new(),
    });
    // Hints go to the counter and, while a copy of guest memory runs, to that copy.
    let sink = Arc::new(CopySink::new(counter.clone()));
    let discards = Arc::new(TrackingBackend::new(opts.discard_mode().backend()));
    let mem = empty_memory();
    let mut daemon = Daemon::new(
        opts.balloon_config(),
        mem.clone(),
        sink.clone(),
        discards.clone(),
    )
    .map_err(|e| e.to_string())?;
    let interval = opts.stats_interval();
    if !interval.is_zero() {
        lock(daemon.backend().balloon())
            .set_stats_interval(interval)
            .map_err(|e| format!("cannot arm the statistics timer: {e}"))?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    if let Some(path) = &opts.control {
        let listener = bind(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut ctl = BalloonController::new(daemon.backend().balloon().clone())
            .with_hint_counter(counter.clone())
            .on_shutdown(|| {
                info!("vhost-user-balloon: shutdown requested on the control socket");
                std::process::exit(0);
            });
        if let Some(capture) = opts.capture_path() {
            ctl = ctl.with_capture(
                CaptureTarget {
                    path: capture.clone(),
                    description: "vhost-user frontend".into(),
                },
                mem.clone(),
            );
        }
        let copier = Copier::new(mem.clone(), daemon.backend().hint_control(), sink);
        let ctl = Arc::new(DaemonController::new(ctl, &daemon, Some(discards)).with_copier(copier));
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || control::serve(listener, ctl, stop))
            .map_err(|e| format!("cannot start the control thread: {e}"))?;
        info!("vhost-user-balloon: control socket {}", path.display());
    }
    let listener: UnixListener =
        bind(&opts.socket).map_err(|e| format!("{}: {e}", opts.socket.display()))?;
    info!(
        "vhost-user-balloon: vhost-user socket {}",
        opts.socket.display()
    );
    let result = daemon.run(&listener, &stop, false);
    stop.store(true, Ordering::Release);
    result.map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let opts = Options::parse();
    let logger = Box::new(StderrLog {
        start: Instant::now(),
    });
    if log::set_logger(Box::leak(logger)).is_ok() {
        log::set_max_level(opts.log_level);
    }
    match run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("vhost-user-balloon: {e}");
            eprintln!("vhost-user-balloon: {e}");
            ExitCode::FAILURE
        }
    }
}
