// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The daemon binary as the real-guest tests run it: its sockets in a directory of its own,
//! its log shown when a test fails, and a guest booted against it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vhost_user_balloon::control;

use super::{Uml, UmlConfig};

/// How long the daemon's sockets and the device's activation may take.
pub const T: Duration = Duration::from_secs(30);

/// One guest at a time: UML's page faults are CPU-bound and the figures are clearer alone.
pub fn one_guest_at_a_time() -> MutexGuard<'static, ()> {
    static GUESTS: Mutex<()> = Mutex::new(());
    GUESTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits until `cond` holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// A `/proc/meminfo` figure in bytes.
pub fn kib(meminfo: &HashMap<String, u64>, key: &str) -> u64 {
    *meminfo
        .get(key)
        .unwrap_or_else(|| panic!("{key} missing from /proc/meminfo"))
        * 1024
}

/// A JSON number.
pub fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// The daemon binary, with its sockets in a directory of its own.
pub struct Daemon {
    child: Child,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub control: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts the daemon with `flags`, in a directory named after `name`.
    pub fn start(name: &str, flags: &[&str]) -> Daemon {
        let dir = std::env::temp_dir().join(format!("vub-real-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("balloon.sock");
        let control = dir.join("control.sock");
        let log = dir.join("daemon.log");
        let child = Command::new(env!("CARGO_BIN_EXE_vhost-user-balloon"))
            .arg("--socket")
            .arg(&socket)
            .arg("--control")
            .arg(&control)
            .args(flags)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start vhost-user-balloon");
        let d = Daemon {
            child,
            dir,
            socket,
            control,
            log,
        };
        wait_until("the daemon's sockets", T, || {
            d.socket.exists() && d.control.exists()
        });
        d
    }

    /// A request, whatever its answer.
    pub fn ask(&self, request: &Value) -> Value {
        control::request(&self.control, request, Duration::from_secs(300))
            .unwrap_or_else(|e| panic!("control request {request}: {e}"))
    }

    /// A request that must succeed.
    pub fn req(&self, request: Value) -> Value {
        let answer = self.ask(&request);
        assert_eq!(answer["ok"], json!(true), "{request} -> {answer}");
        answer
    }

    /// The daemon's `status`.
    pub fn status(&self) -> Value {
        self.req(json!({"cmd": "status"}))
    }

    /// Boots a guest against the daemon and waits until the device is active.
    pub fn boot(&self, mem_mib: u64, extra_args: &[&str]) -> Uml {
        let uml = Uml::boot(&UmlConfig {
            mem_mib,
            socket: self.socket.clone(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(uml.balloon_module_loaded(), Some(true));
        wait_until("the device to be active", T, || {
            self.status()["activated"] == json!(true)
        });
        println!("guest of {mem_mib} MiB ready after {:?}", uml.boot_time());
        uml
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            if let Ok(text) = std::fs::read_to_string(&self.log) {
                eprintln!("=== daemon log ===\n{text}=== end of daemon log ===");
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
