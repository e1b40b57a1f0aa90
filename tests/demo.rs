//! The README's main command, `vxnet lab demo`, passes end to end and leaves nothing behind.

mod common;

use std::process::Command;

#[test]
fn lab_demo_passes_and_cleans_up() {
    let child = Command::new(common::binary())
        .args(["lab", "demo"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let scratch = format!("vxnet-local-{}-", child.id());
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
        "etcdctl endpoint health",
        "NETWORK ID",
        "my-net",
        "10.0.4.2",
        "02:42:0a:00:04:02",
    ] {
        assert!(
            stdout.contains(step),
            "demo output lacks {step:?}:\n{stdout}"
        );
    }

    // Nothing of the lab is left: no scratch directory, no process started from it.
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&scratch))
        .collect();
    assert!(leftovers.is_empty(), "scratch dirs left: {leftovers:?}");
    for proc_dir in std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()) {
        let cmdline = std::fs::read(proc_dir.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        assert!(
            !cmdline.contains(&scratch),
            "process left running: {cmdline}"
        );
    }
}
