//! Malformed requests sent over a real vhost-user socket are answered with IOERR or UNSUPP,
//! counted in the API, never reach the journal, and leave the daemon serving.

use sealvm_testkit::background::{counter_moved as moved, BlkDaemon as Daemon};
use sealvm_testkit::loadgen::{status, types};
use sealvm_testkit::loadgen::{BlkDriver, RawDescriptor, Slot};
use std::time::Duration;

const SLOT: Slot = Slot(0);

fn readable(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor {
        addr,
        len,
        writable: false,
    }
}

fn writable(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor {
        addr,
        len,
        writable: true,
    }
}

fn status_descriptor() -> RawDescriptor {
    writable(BlkDriver::status_addr(SLOT), 1)
}

/// Sends `chain` and returns the status the device wrote.
fn answer(driver: &mut BlkDriver, chain: &[RawDescriptor]) -> u8 {
    driver.submit_chain(SLOT, chain).unwrap();
    let (slot, state) = driver.complete().expect("the device answers");
    assert_eq!(slot, SLOT);
    state
}

/// A write and a read-back at `sector` succeed.
fn still_serves(driver: &mut BlkDriver, sector: u64, fill: u8) {
    driver.write(sector, &[fill; 4096]).unwrap();
    assert_eq!(driver.read(sector, 4096).unwrap(), vec![fill; 4096]);
}

#[test]
fn malformed_requests_get_error_status_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("vol.raw");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    let spec = format!(
        "vol={},journal={}",
        base.display(),
        dir.path().join("vol.journal").display()
    );
    let mut daemon = Daemon::serve(dir.path(), "vol", &spec).expect("start sealvm-blk");
    let mut driver = BlkDriver::connect(&daemon.socket, Duration::from_secs(10)).unwrap();
    let capacity = driver.capacity_sectors();
    still_serves(&mut driver, 0, 0xa5);
    driver.flush().unwrap();
    let before = daemon.counters().expect("counters");
    let outside = 1u64 << 40;
    let header = readable(BlkDriver::header_addr(SLOT), 16);

    // Write data outside guest memory.
    driver.write_header(SLOT, types::OUT, 8);
    let data = readable(outside, 512);
    assert_eq!(
        answer(&mut driver, &[header, data, status_descriptor()]),
        status::IOERR,
        "data outside guest memory"
    );
    still_serves(&mut driver, 16, 1);
    // The header itself outside guest memory.
    assert_eq!(
        answer(&mut driver, &[readable(outside, 16), status_descriptor()]),
        status::IOERR,
        "header outside guest memory"
    );
    still_serves(&mut driver, 16, 2);
    // A header of 8 bytes.
    driver.write_header(SLOT, types::IN, 0);
    let short = readable(BlkDriver::header_addr(SLOT), 8);
    assert_eq!(
        answer(&mut driver, &[short, status_descriptor()]),
        status::IOERR,
        "header too short"
    );
    still_serves(&mut driver, 16, 3);
    // A read reaching past the end of the disk.
    driver.write_header(SLOT, types::IN, capacity - 1);
    let buffer = writable(BlkDriver::data_addr(SLOT), 1024);
    assert_eq!(
        answer(&mut driver, &[header, buffer, status_descriptor()]),
        status::IOERR,
        "read past the end"
    );
    still_serves(&mut driver, 16, 4);
    // A request type no virtio-blk device knows.
    driver.write_header(SLOT, 99, 0);
    assert_eq!(
        answer(&mut driver, &[header, status_descriptor()]),
        status::UNSUPP,
        "unknown request type"
    );
    still_serves(&mut driver, 16, 5);
    assert!(daemon.is_running());

    let after = daemon.counters().expect("counters");
    let m = |key| moved(&before, &after, key);
    assert_eq!(m("/guest-errors"), 5, "{after}");
    assert_eq!(m("/io-errors"), 0, "{after}");
    // All but the write with data outside memory were refused before they ran.
    assert_eq!(m("/requests-by-kind/rejected"), 4, "{after}");
    assert_eq!(m("/requests"), 5 + 5 * 2, "{after}");
    // Only the five good writes reached the journal.
    assert_eq!(m("/journal-writes"), 5, "{after}");
    assert_eq!(m("/write-bytes"), 5 * 4096, "{after}");
    assert_eq!(m("/last-seq"), 5, "{after}");
    // The acknowledged, flushed write from before is intact.
    assert_eq!(driver.read(0, 4096).unwrap(), vec![0xa5; 4096]);
}

#[test]
fn a_write_to_a_read_only_volume_fails_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("ro.raw");
    std::fs::write(&image, vec![0x5au8; 1 << 20]).unwrap();
    let spec = format!("ro={},readonly", image.display());
    let mut daemon = Daemon::serve(dir.path(), "ro", &spec).expect("start sealvm-blk");
    let mut driver = BlkDriver::connect(&daemon.socket, Duration::from_secs(10)).unwrap();
    let before = daemon.counters().expect("counters");
    driver.write_header(SLOT, types::OUT, 0);
    driver.write_guest(BlkDriver::data_addr(SLOT), &[0u8; 512]);
    let chain = [
        readable(BlkDriver::header_addr(SLOT), 16),
        readable(BlkDriver::data_addr(SLOT), 512),
        status_descriptor(),
    ];
    assert_eq!(answer(&mut driver, &chain), status::IOERR);
    assert_eq!(driver.read(0, 512).unwrap(), vec![0x5a; 512]);
    assert!(daemon.is_running());
    let after = daemon.counters().expect("counters");
    assert_eq!(moved(&before, &after, "/guest-errors"), 1, "{after}");
    assert_eq!(
        moved(&before, &after, "/requests-by-kind/rejected"),
        1,
        "{after}"
    );
    assert!(std::fs::read(&image).unwrap().iter().all(|&b| b == 0x5a));
}
