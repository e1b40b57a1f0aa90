//! The README's main command, `vxnet lab demo` (the seed walk-through on a three-host lab),
//! passes end to end and leaves nothing behind.

mod common;

use std::process::{Command, Stdio};

#[test]
fn lab_demo_passes_and_cleans_up() {
    let child = Command::new(common::binary())
        .args(["lab", "demo"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lab_dir = format!("/run/vxnet-lab/demo-{}", child.id());
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("vxnet lab demo: PASS"), "{stdout}");
    assert!(!stdout.contains("FAILED"), "{stdout}");
    for step in [
        "is healthy",
        "NETWORK ID",
        "my-net   overlay   global",
        "mtu 1450",
        "link/ether 02:42:0a:00:04:",
        "10.0.4.1/24",
        "master br0",
        " 0% packet loss",
    ] {
        assert!(
            stdout.contains(step),
            "demo output lacks {step:?}:\n{stdout}"
        );
    }

    // Nothing of the lab is left: no directory, no mount, no process started from it.
    assert!(
        !std::path::Path::new(&lab_dir).exists(),
        "{lab_dir} left behind"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&lab_dir), "mounts left under {lab_dir}");
    for proc_dir in std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()) {
        let cmdline = std::fs::read(proc_dir.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        assert!(
            !cmdline.contains(&lab_dir),
            "process left running: {cmdline}"
        );
    }
}
