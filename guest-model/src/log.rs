// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A logger that formats every record, so the device's rate-limited warnings really format
//! their arguments in the tests that provoke them. Shared by the test binaries.

use std::sync::Once;

struct FormattingLogger;

impl log::Log for FormattingLogger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        assert!(!record.args().to_string().is_empty());
    }

    fn flush(&self) {}
}

static LOGGER: FormattingLogger = FormattingLogger;

/// Installs the logger for the whole test binary (once).
pub fn log_everything() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        log::set_logger(&LOGGER).expect("the only logger");
        log::set_max_level(log::LevelFilter::Trace);
    });
}
