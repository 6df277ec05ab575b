//! Recovery of an external backend: `vhost-user-console`, started by the test (not the
//! bridge), is killed with SIGKILL and started again on the same socket. The bridge
//! reconnects to it and replays both queues from the guest's used indexes: output the guest
//! queued while no backend ran reaches the new console, and the receive buffers the guest
//! posted before the crash take the new console's input. No interrupt may be lost (the
//! bridge's drop check).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use hvisor_vhost_tests::driver::console::{feature, ConsoleDriver, ConsoleOptions};
use hvisor_vhost_tests::driver::mmio::VIRTIO_F_VERSION_1;
use hvisor_vhost_tests::driver::GuestAllocator;
use hvisor_vhost_tests::harness::{bin_path, Process, SimBridge};

const CONSOLE: u64 = 0xa003e00;
const IRQ: u32 = 79;

/// `vhost-user-console` serving `vhost_user`, with its console on the UNIX socket `console`.
fn start_backend(vhost_user: &Path, console: &Path) -> Process {
    // A killed backend leaves its sockets behind.
    let _ = std::fs::remove_file(vhost_user);
    let _ = std::fs::remove_file(console);
    let mut cmd = Command::new(bin_path("vhost-user-console"));
    cmd.arg("-s").arg(vhost_user).arg("--socket").arg(console);
    Process::spawn("vhost-user-console", &mut cmd)
}

/// Connects to the console socket once the backend has created it.
fn connect(path: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => {
                stream
                    .set_read_timeout(Some(Duration::from_secs(20)))
                    .unwrap();
                return stream;
            }
            Err(e) => assert!(Instant::now() < deadline, "connect {}: {e}", path.display()),
        }
        std::thread::yield_now();
    }
}

#[test]
fn external_console_backend_killed_and_restarted_loses_no_byte() {
    let dir = dir_with_images("con-recovery", &[]);
    let vhost_user = dir.path().join("console-vu.sock");
    let console_path = dir.path().join("console.sock");
    let mut backend = start_backend(&vhost_user, &console_path);
    let entry = format!(
        r#"{{"type":"console","addr":"{CONSOLE:#x}","len":"0x200","irq":{IRQ},"socket":"{}","status":"enable"}}"#,
        vhost_user.display()
    );
    let mut sb = SimBridge::start(dir, &config(&[zone(1, &[entry], None)]), &[]);
    let g = Guest::new(&sb, 1, 0, IRQ);
    let options = ConsoleOptions {
        features: feature::SIZE | VIRTIO_F_VERSION_1 | 1 << 29,
        ..ConsoleOptions::default()
    };
    let mut alloc = GuestAllocator::new(RAM_BASE + 0x10_0000, 0x200_0000);
    let mut console = ConsoleDriver::new(&g.vcpu, CONSOLE, &g.ram, &g.irq, &mut alloc, &options)
        .unwrap_or_else(|e| panic!("console init: {e}"));
    let mut client = connect(&console_path);

    let echo = |console: &mut ConsoleDriver<'_, _, _, _>, client: &mut UnixStream, line: &str| {
        client.write_all(line.as_bytes()).unwrap();
        assert_eq!(console.read_exact(line.len()).unwrap(), line.as_bytes());
        console.write(line.as_bytes()).unwrap();
        let mut back = vec![0u8; line.len()];
        client.read_exact(&mut back).unwrap();
        assert_eq!(back, line.as_bytes());
    };
    echo(&mut console, &mut client, "before the crash\n");
    // The backend writes a transmit buffer out before it marks it used; a crash in between
    // has the restored backend send it again (replay from the used index is at least once).
    // This test is about output written while no backend runs: the crash comes after the
    // echo's buffer is used.
    console.flush().unwrap();
    let posted = console.rx_posted();
    assert!(posted > 0, "receive buffers are in flight across the crash");

    backend.signal(libc::SIGKILL);
    assert!(backend.wait_timeout(Duration::from_secs(10)).is_some());
    drop(client);
    // Output queued while no backend runs waits in the transmit ring.
    let down = b"written while the backend was down\n";
    console.write(down).unwrap();

    // It stops after the bridge.
    sb.extra.push(start_backend(&vhost_user, &console_path));
    let mut client = connect(&console_path);
    let mut got = vec![0u8; down.len()];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got[..], &down[..], "output queued during the crash");
    echo(&mut console, &mut client, "after the restart\n");
    console.flush().unwrap();
    assert_eq!(console.lost_interrupts(), 0);
}
