use super::*;
use crate::backend::RawFile;
use vm_memory::GuestMemoryMmap;

const HDR: u64 = 0x1000;
const DATA: u64 = 0x2000;
const STATUS: u64 = 0x9000;

struct Fixture {
    mem: GuestMemoryMmap<()>,
    disk: RawFile,
    _file: tempfile::NamedTempFile,
    limits: Limits,
}

fn fixture(sectors: u64, read_only: bool) -> Fixture {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(sectors * 512).unwrap();
    let disk = RawFile::open(file.path(), read_only).unwrap();
    Fixture {
        mem,
        disk,
        _file: file,
        limits: Limits::for_capacity(sectors, read_only),
    }
}

fn header(mem: &GuestMemoryMmap<()>, request_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
}

fn seg(addr: u64, len: u32, writable: bool) -> Segment {
    Segment {
        addr,
        len,
        writable,
    }
}

fn status_byte(mem: &GuestMemoryMmap<()>) -> u8 {
    let mut b = [0xffu8];
    mem.read_slice(&mut b, GuestAddress(STATUS)).unwrap();
    b[0]
}

fn run(f: &Fixture, chain: &[Segment]) -> (u32, u8) {
    match Request::parse(&f.mem, chain, &f.limits) {
        Ok(request) => {
            let (used, _) = request.execute(&f.mem, &f.disk, &f.limits);
            (used, status_byte(&f.mem))
        }
        Err(rejected) => (rejected.answer(&f.mem), status_byte(&f.mem)),
    }
}

#[test]
fn write_then_read_round_trips_through_the_file() {
    let f = fixture(64, false);
    f.mem
        .write_slice(&[0xab; 1024], GuestAddress(DATA))
        .unwrap();
    header(&f.mem, types::OUT, 3);
    let chain = [
        seg(HDR, 16, false),
        seg(DATA, 1024, false),
        seg(STATUS, 1, true),
    ];
    assert_eq!(run(&f, &chain), (1, status::OK));

    f.mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
    header(&f.mem, types::IN, 3);
    let chain = [
        seg(HDR, 16, false),
        seg(DATA, 1024, true),
        seg(STATUS, 1, true),
    ];
    assert_eq!(run(&f, &chain), (1025, status::OK));
    let mut back = [0u8; 1024];
    f.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, [0xab; 1024]);
    let on_disk = std::fs::read(f._file.path()).unwrap();
    assert_eq!(&on_disk[3 * 512..5 * 512], &[0xab; 1024][..]);
    assert_eq!(on_disk[5 * 512], 0);
}

#[test]
fn header_split_across_descriptors_and_data_with_status_in_one() {
    let f = fixture(8, false);
    header(&f.mem, types::OUT, 1);
    f.mem.write_slice(&[7u8; 512], GuestAddress(DATA)).unwrap();
    // Header in two pieces; header tail and data in one readable buffer.
    let mut h = [0u8; 16];
    f.mem.read_slice(&mut h, GuestAddress(HDR)).unwrap();
    f.mem.write_slice(&h[4..], GuestAddress(DATA - 12)).unwrap();
    let chain = [
        seg(HDR, 4, false),
        seg(DATA - 12, 12 + 512, false),
        seg(STATUS, 1, true),
    ];
    assert_eq!(run(&f, &chain), (1, status::OK));
    assert_eq!(
        &std::fs::read(f._file.path()).unwrap()[512..1024],
        &[7u8; 512][..]
    );
}

#[test]
fn out_of_range_and_overflowing_sectors_fail_with_ioerr() {
    let f = fixture(8, false);
    for sector in [8, 7, u64::MAX, u64::MAX >> 9] {
        header(&f.mem, types::OUT, sector);
        let chain = [
            seg(HDR, 16, false),
            seg(DATA, 1024, false),
            seg(STATUS, 1, true),
        ];
        assert_eq!(run(&f, &chain), (1, status::IOERR), "sector {sector}");
    }
}

#[test]
fn chain_without_status_is_rejected_without_writing() {
    let f = fixture(8, false);
    header(&f.mem, types::OUT, 0);
    let rejected = Request::parse(&f.mem, &[seg(HDR, 16, false)], &f.limits).unwrap_err();
    assert!(matches!(rejected.error, RequestError::NoStatus));
    assert_eq!(rejected.answer(&f.mem), 0);
}

#[test]
fn readable_after_writable_is_rejected() {
    let f = fixture(8, false);
    header(&f.mem, types::OUT, 0);
    let chain = [
        seg(HDR, 16, false),
        seg(DATA, 512, true),
        seg(DATA, 512, false),
        seg(STATUS, 1, true),
    ];
    let rejected = Request::parse(&f.mem, &chain, &f.limits).unwrap_err();
    assert!(matches!(rejected.error, RequestError::BadOrder));
    assert_eq!(run(&f, &chain), (1, status::IOERR));
}

#[test]
fn unknown_type_is_unsupported() {
    let f = fixture(8, false);
    header(&f.mem, 99, 0);
    assert_eq!(
        run(&f, &[seg(HDR, 16, false), seg(STATUS, 1, true)]),
        (1, status::UNSUPP)
    );
}

#[test]
fn write_to_read_only_disk_fails() {
    let f = fixture(8, true);
    header(&f.mem, types::OUT, 0);
    let chain = [
        seg(HDR, 16, false),
        seg(DATA, 512, false),
        seg(STATUS, 1, true),
    ];
    assert_eq!(run(&f, &chain), (1, status::IOERR));
}

#[test]
fn wrong_direction_partial_sector_and_oversized_requests_fail() {
    let f = fixture(1 << 16, false);
    header(&f.mem, types::OUT, 0);
    let wrong_way = [
        seg(HDR, 16, false),
        seg(DATA, 512, true),
        seg(STATUS, 1, true),
    ];
    assert_eq!(run(&f, &wrong_way), (1, status::IOERR));
    let partial = [
        seg(HDR, 16, false),
        seg(DATA, 100, false),
        seg(STATUS, 1, true),
    ];
    assert_eq!(run(&f, &partial), (1, status::IOERR));
    let huge = [
        seg(HDR, 16, false),
        seg(0, !511, false),
        seg(STATUS, 1, true),
    ];
    let rejected = Request::parse(&f.mem, &huge, &f.limits).unwrap_err();
    assert!(matches!(rejected.error, RequestError::TooLarge { .. }));
}

#[test]
fn too_many_descriptors_fail() {
    let f = fixture(1 << 16, false);
    header(&f.mem, types::OUT, 0);
    let mut chain = vec![seg(HDR, 16, false)];
    chain.extend((0..200).map(|i| seg(DATA + i * 512, 512, false)));
    chain.push(seg(STATUS, 1, true));
    let rejected = Request::parse(&f.mem, &chain, &f.limits).unwrap_err();
    assert!(matches!(
        rejected.error,
        RequestError::TooManySegments { .. }
    ));
}

#[test]
fn buffers_outside_guest_memory_fail_without_panic() {
    let f = fixture(8, false);
    header(&f.mem, types::IN, 0);
    let chain = [
        seg(HDR, 16, false),
        seg(0xfff_ff00, 512, true),
        seg(STATUS, 1, true),
    ];
    assert_eq!(run(&f, &chain), (1, status::IOERR));
    let bad_header = [seg(u64::MAX - 4, 16, false), seg(STATUS, 1, true)];
    assert_eq!(run(&f, &bad_header), (1, status::IOERR));
    let bad_status = [seg(HDR, 16, false), seg(u64::MAX, 1, true)];
    let rejected = Request::parse(&f.mem, &bad_status, &f.limits);
    match rejected {
        Ok(r) => assert_eq!(r.execute(&f.mem, &f.disk, &f.limits).0, 0),
        Err(r) => assert_eq!(r.answer(&f.mem), 0),
    }
}

#[test]
fn get_id_returns_the_backend_id() {
    let f = fixture(8, false);
    header(&f.mem, types::GET_ID, 0);
    let chain = [
        seg(HDR, 16, false),
        seg(DATA, 20, true),
        seg(STATUS, 1, true),
    ];
    assert_eq!(run(&f, &chain), (21, status::OK));
    let mut id = [0u8; 20];
    f.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    let expected = f.disk.device_id();
    assert_eq!(&id[..expected.len()], expected);
}

#[test]
fn write_zeroes_clears_and_discard_rejects_unmap_flag() {
    let f = fixture(16, false);
    std::fs::write(f._file.path(), vec![0x55u8; 16 * 512]).unwrap();
    let mut segment = [0u8; 16];
    segment[0..8].copy_from_slice(&2u64.to_le_bytes());
    segment[8..12].copy_from_slice(&3u32.to_le_bytes());
    f.mem.write_slice(&segment, GuestAddress(DATA)).unwrap();
    header(&f.mem, types::WRITE_ZEROES, 0);
    let chain = [
        seg(HDR, 16, false),
        seg(DATA, 16, false),
        seg(STATUS, 1, true),
    ];
    assert_eq!(run(&f, &chain), (1, status::OK));
    let data = std::fs::read(f._file.path()).unwrap();
    assert!(data[1024..2560].iter().all(|&b| b == 0));
    assert_eq!(data[2560], 0x55);
    assert_eq!(data[1023], 0x55);

    segment[12..16].copy_from_slice(&1u32.to_le_bytes());
    f.mem.write_slice(&segment, GuestAddress(DATA)).unwrap();
    header(&f.mem, types::DISCARD, 0);
    assert_eq!(run(&f, &chain), (1, status::UNSUPP));
    segment[0..8].copy_from_slice(&15u64.to_le_bytes());
    segment[12..16].copy_from_slice(&0u32.to_le_bytes());
    f.mem.write_slice(&segment, GuestAddress(DATA)).unwrap();
    assert_eq!(run(&f, &chain), (1, status::IOERR));
}

#[test]
fn a_locked_image_is_refused() {
    let f = fixture(8, false);
    match RawFile::open(f._file.path(), false) {
        Err(crate::backend::RawFileError::Locked { .. }) => {}
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("second writer opened a locked image"),
    }
}
