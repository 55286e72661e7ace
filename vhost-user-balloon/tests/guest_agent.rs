// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Boots the real-guest UML kernel without any balloon backend (the
//! vhost-user socket it is given has no listener) and checks that the
//! guest agent and its parsers work. Needs `scripts/real-guest/setup.sh`
//! to have been run; fails (does not skip) otherwise.

mod guest;

use guest::{buddy_free_pages, parse_kv, Uml, UmlConfig};
use std::thread;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

fn mem_free_kib(uml: &mut Uml) -> u64 {
    let meminfo = uml.meminfo().expect("meminfo");
    *meminfo.get("MemFree").expect("MemFree in meminfo")
}

#[test]
fn agent_without_balloon_backend() {
    let started = Instant::now();
    let dir = std::env::temp_dir().join(format!("vub-guest-agent-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    // Nobody listens here: virtio_uml's probe fails and the guest boots on.
    let socket = dir.join("no-listener.sock");

    let mut uml = Uml::boot(&UmlConfig {
        mem_mib: 256,
        socket,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("agent ready after {:?}", uml.boot_time());
    assert_eq!(uml.balloon_module_loaded(), Some(true));
    assert!(
        uml.console_log()
            .contains("virtio-uml: probe of virtio-uml.0 failed"),
        "expected virtio_uml's probe to fail without a backend"
    );

    // Framing and error answers.
    assert_eq!(uml.cmd("echo hello  world", T).unwrap(), "hello  world");
    let reply = uml.cmd_reply("no-such-command", T).unwrap();
    assert!(!reply.ok);
    assert!(reply.message.contains("unknown command"), "{reply:?}");
    assert!(!uml.cmd_reply("dirty lots", T).unwrap().ok);
    assert!(!uml.cmd_reply("dirty 0", T).unwrap().ok);
    assert!(!uml.cmd_reply("alloc 99999999999999999999", T).unwrap().ok);
    assert!(!uml.cmd_reply("meminfo please", T).unwrap().ok);
    assert!(uml.cmd("sh echo a; echo b", T).unwrap() == "a\nb");
    let reply = uml.cmd_reply("sh exit 3", T).unwrap();
    assert!(!reply.ok && reply.message.contains("status 3"), "{reply:?}");
    assert!(uml.cmd("help", T).unwrap().contains("dirty <MiB>"));

    // No balloon device: features says so.
    let reply = uml.cmd_reply("features", T).unwrap();
    assert!(
        !reply.ok && reply.message.contains("no virtio balloon"),
        "{reply:?}"
    );
    assert!(uml.dmesg().unwrap().contains("Linux version"));

    // meminfo and buddyinfo agree.
    let meminfo = uml.meminfo().unwrap();
    let total = meminfo["MemTotal"];
    assert!(
        (128 * 1024..=256 * 1024).contains(&total),
        "MemTotal {total} kB for mem=256M"
    );
    let buddy = uml.buddyinfo().unwrap();
    assert_eq!(buddy.len(), 11, "orders 0..=10 in Linux 6.1: {buddy:?}");
    let buddy_kib = buddy_free_pages(&buddy) * 4;
    let free = meminfo["MemFree"];
    assert!(
        buddy_kib <= free + 4096 && buddy_kib + free / 10 + 8192 >= free,
        "buddyinfo {buddy_kib} kB vs MemFree {free} kB"
    );
    let vmstat = uml.vmstat().unwrap();
    assert!(
        vmstat.contains_key("balloon_inflate"),
        "CONFIG_MEMORY_BALLOON"
    );

    // dirty gives the memory back.
    let before = mem_free_kib(&mut uml);
    let report = uml.dirty(32).unwrap();
    assert_eq!(report["got_mib"], "32");
    assert!(report["ms"].parse::<u64>().is_ok(), "{report:?}");
    let after = mem_free_kib(&mut uml);
    assert!(
        after + 8 * 1024 >= before,
        "dirty kept memory: {before} -> {after} kB"
    );

    // alloc holds it until release.
    let reply = uml.alloc(32).unwrap();
    assert!(reply.ok, "{reply:?}");
    assert_eq!(reply.kv_u64("got_mib"), Some(32));
    let held = mem_free_kib(&mut uml);
    assert!(held + 28 * 1024 <= after, "alloc 32: {after} -> {held} kB");
    assert_eq!(parse_kv(&uml.cmd("held", T).unwrap())["held_mib"], "32");
    let released = uml.release().unwrap();
    assert_eq!(released["freed_mib"], "32");
    let back = mem_free_kib(&mut uml);
    assert!(back + 8 * 1024 >= after, "release: {held} -> {back} kB");

    // fill writes through the page cache and frees it; with hold, keeps it until release.
    let report = uml.fill(64).unwrap();
    assert_eq!(report["got_mib"], "64", "{report:?}");
    let filled = mem_free_kib(&mut uml);
    assert!(
        filled + 8 * 1024 >= back,
        "fill kept memory: {back} -> {filled} kB"
    );
    let reply = uml.cmd_reply("fill 32 hold", T).unwrap();
    assert!(reply.ok, "{reply:?}");
    assert_eq!(reply.kv_u64("held_fill_mib"), Some(32));
    let held = mem_free_kib(&mut uml);
    assert!(
        held + 28 * 1024 <= filled,
        "fill 32 hold: {filled} -> {held} kB"
    );
    assert_eq!(uml.release().unwrap()["freed_mib"], "32");
    assert!(mem_free_kib(&mut uml) + 8 * 1024 >= filled);
    for bad in ["fill", "fill 0", "fill 8 keep", "fill x hold"] {
        assert!(!uml.cmd_reply(bad, T).unwrap().ok, "{bad}");
    }

    // stop and resume: every process of UML stops, and the guest goes on afterwards (a
    // signal to UML's ptraced processes would kill them).
    let seq = uml.send("sh sleep 1; echo slept").unwrap();
    let took = uml.stop().unwrap();
    eprintln!("UML stopped in {took:?}");
    assert!(uml.stop().is_err(), "stopped twice");
    thread::sleep(Duration::from_millis(1500));
    uml.resume().unwrap();
    let reply = uml.wait_reply(seq, "sh sleep 1; echo slept", T).unwrap();
    assert_eq!(reply.body, "slept", "{reply:?}");
    assert!(uml.resume().is_err(), "resumed twice");

    // More than the guest has: the allocating child is OOM-killed and the
    // agent (PID 1) reports how far it got.
    let reply = uml.alloc(1024).unwrap();
    assert!(!reply.ok, "{reply:?}");
    let got = reply.kv_u64("got_mib").expect("got_mib");
    assert!(
        got > 64 && got < 256,
        "got {got} MiB of 1024 in a 256 MiB guest"
    );
    assert!(reply.message.contains("signal 9"), "{reply:?}");
    assert_eq!(uml.cmd("echo still here", T).unwrap(), "still here");
    assert_eq!(parse_kv(&uml.cmd("held", T).unwrap())["held_mib"], "0");

    let status = uml.poweroff(T).unwrap();
    assert!(status.success(), "UML exit status {status}");
    eprintln!("whole test took {:?}", started.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
}
