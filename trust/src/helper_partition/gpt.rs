//! A minimal GPT (UEFI 2.x) reader and writer for disk images: protective MBR, primary
//! header at LBA 1 with 128 entries of 128 bytes from LBA 2, backup entries and header at
//! the end. 512-byte logical blocks only. Enough to add and find one partition; it does not
//! resize disks or repair damaged tables.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Logical block size this module assumes.
pub const LBA: u64 = 512;
const ENTRIES: u32 = 128;
const ENTRY_SIZE: u32 = 128;
const ENTRY_LBAS: u64 = (ENTRIES as u64 * ENTRY_SIZE as u64) / LBA;
const ALIGN_LBAS: u64 = 2048;

/// Errors reading or writing a GPT.
#[derive(Debug, thiserror::Error)]
pub enum GptError {
    /// File I/O failed.
    #[error("cannot {0} the disk image")]
    Io(&'static str, #[source] io::Error),
    /// The image has no valid primary GPT header.
    #[error("the disk image has no valid GPT")]
    NoGpt,
    /// The image is too small or has no room for the requested partition.
    #[error("no room for a {0}-byte partition in the disk image")]
    NoRoom(u64),
    /// The header's partition entry array lies outside the disk.
    #[error("the GPT's partition entry array (LBA {lba}) lies outside the {disk_bytes}-byte disk")]
    EntriesOutOfRange {
        /// The entry array's first LBA, as the header says.
        lba: u64,
        /// The disk's size.
        disk_bytes: u64,
    },
    /// A partition entry's LBA range is inverted or runs past the disk.
    #[error("GPT entry {slot} spans LBA {first_lba}..={last_lba}, outside the {disk_lbas}-LBA disk or inverted")]
    EntryOutOfRange {
        /// The entry's slot.
        slot: usize,
        /// Its first LBA.
        first_lba: u64,
        /// Its last LBA.
        last_lba: u64,
        /// The disk's size in LBAs.
        disk_lbas: u64,
    },
}

/// A disk image read at byte offsets: the helper disk file, or bytes in memory (fuzzing).
/// Every offset read from the image is checked against [`DiskImage::len_bytes`] before use.
pub trait DiskImage {
    /// The image's size in bytes.
    fn len_bytes(&self) -> io::Result<u64>;
    /// Fills `buf` from `offset`; fails past the end.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl DiskImage for File {
    fn len_bytes(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }
}

impl DiskImage for &[u8] {
    fn len_bytes(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start
            .checked_add(buf.len())
            .filter(|&end| end <= self.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(&self[start..end]);
        Ok(())
    }
}

/// One GPT partition entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Partition type GUID, in GPT's on-disk (mixed-endian) byte order.
    pub type_guid: [u8; 16],
    /// Unique partition GUID, on-disk order.
    pub unique_guid: [u8; 16],
    /// First LBA.
    pub first_lba: u64,
    /// Last LBA, inclusive.
    pub last_lba: u64,
    /// Attribute bits.
    pub attributes: u64,
    /// Partition name (UTF-16LE on disk, up to 36 code units).
    pub name: String,
}

/// A parsed GPT: the disk GUID and the used entries (with their slot index).
#[derive(Debug, Clone)]
pub struct Gpt {
    /// Disk GUID, on-disk order.
    pub disk_guid: [u8; 16],
    /// Used entries as (slot index, entry).
    pub entries: Vec<(usize, Entry)>,
    /// First usable LBA.
    pub first_usable: u64,
    /// Last usable LBA.
    pub last_usable: u64,
}

/// Converts a textual GUID ("xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx") to GPT on-disk order.
/// Panics on a malformed constant; call it only with literals.
pub const fn guid_bytes(text: &str) -> [u8; 16] {
    let s = text.as_bytes();
    let mut raw = [0u8; 16];
    let mut i = 0;
    let mut n = 0;
    while i < s.len() {
        if s[i] != b'-' {
            let hi = hex_val(s[i]);
            let lo = hex_val(s[i + 1]);
            raw[n] = hi << 4 | lo;
            n += 1;
            i += 2;
        } else {
            i += 1;
        }
    }
    [
        raw[3], raw[2], raw[1], raw[0], raw[5], raw[4], raw[7], raw[6], raw[8], raw[9], raw[10],
        raw[11], raw[12], raw[13], raw[14], raw[15],
    ]
}

const fn hex_val(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        b'A'..=b'F' => c - b'A' + 10,
        _ => panic!("bad hex digit in GUID constant"),
    }
}

fn random_guid() -> Result<[u8; 16], GptError> {
    let mut g = [0u8; 16];
    getrandom::getrandom(&mut g).map_err(|e| GptError::Io("randomize", e.into()))?;
    g[7] = (g[7] & 0x0f) | 0x40;
    g[8] = (g[8] & 0x3f) | 0x80;
    Ok(g)
}

fn disk_lbas(image: &dyn DiskImage) -> Result<u64, GptError> {
    Ok(image.len_bytes().map_err(|e| GptError::Io("stat", e))? / LBA)
}

/// Reads the primary GPT of `image`. Every LBA in it is checked against the image's size:
/// the entry array must lie inside the image, and each used entry's range must be ordered
/// and inside the image.
pub fn read(image: &dyn DiskImage) -> Result<Gpt, GptError> {
    let mut header = [0u8; 92];
    let lbas = disk_lbas(image)?;
    if lbas < 2 * (ENTRY_LBAS + 2) {
        return Err(GptError::NoGpt);
    }
    image
        .read_at(&mut header, LBA)
        .map_err(|e| GptError::Io("read", e))?;
    if &header[0..8] != b"EFI PART" {
        return Err(GptError::NoGpt);
    }
    let stored_crc = u32::from_le_bytes([header[16], header[17], header[18], header[19]]);
    let mut check = header;
    check[16..20].fill(0);
    if crc32fast::hash(&check) != stored_crc {
        return Err(GptError::NoGpt);
    }
    let le64 = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap_or([0; 8]));
    let le32 = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().unwrap_or([0; 4]));
    let (count, size) = (le32(80), le32(84));
    if !(1..=1024).contains(&count) || !(128..=1024).contains(&size) {
        return Err(GptError::NoGpt);
    }
    let table_len = u64::from(count) * u64::from(size);
    let entries_lba = le64(72);
    let disk_bytes = lbas * LBA;
    let table_at = entries_lba
        .checked_mul(LBA)
        .filter(|&at| {
            entries_lba >= 2
                && at
                    .checked_add(table_len)
                    .is_some_and(|end| end <= disk_bytes)
        })
        .ok_or(GptError::EntriesOutOfRange {
            lba: entries_lba,
            disk_bytes,
        })?;
    // At most 1024 × 1024 bytes, checked above.
    let mut table = vec![0u8; table_len as usize];
    image
        .read_at(&mut table, table_at)
        .map_err(|e| GptError::Io("read", e))?;
    if crc32fast::hash(&table) != le32(88) {
        return Err(GptError::NoGpt);
    }
    let mut disk_guid = [0u8; 16];
    disk_guid.copy_from_slice(&header[56..72]);
    let mut entries = Vec::new();
    for (slot, raw) in table.chunks(size as usize).enumerate() {
        if raw[0..16] == [0u8; 16] {
            continue;
        }
        let entry = parse_entry(raw);
        if entry.first_lba > entry.last_lba || entry.last_lba >= lbas {
            return Err(GptError::EntryOutOfRange {
                slot,
                first_lba: entry.first_lba,
                last_lba: entry.last_lba,
                disk_lbas: lbas,
            });
        }
        entries.push((slot, entry));
    }
    Ok(Gpt {
        disk_guid,
        entries,
        first_usable: le64(40),
        last_usable: le64(48),
    })
}

fn parse_entry(e: &[u8]) -> Entry {
    let mut type_guid = [0u8; 16];
    type_guid.copy_from_slice(&e[0..16]);
    let mut unique_guid = [0u8; 16];
    unique_guid.copy_from_slice(&e[16..32]);
    let units: Vec<u16> = e[56..128]
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    Entry {
        type_guid,
        unique_guid,
        first_lba: u64::from_le_bytes(e[32..40].try_into().unwrap_or([0; 8])),
        last_lba: u64::from_le_bytes(e[40..48].try_into().unwrap_or([0; 8])),
        attributes: u64::from_le_bytes(e[48..56].try_into().unwrap_or([0; 8])),
        name: String::from_utf16_lossy(&units),
    }
}

/// Adds a partition of `bytes` (rounded up to 1 MiB) with `type_guid` and `name` to the
/// image: into its existing GPT after the last partition, or into a new GPT when the image
/// has none. Returns the new entry.
pub fn add_partition(
    file: &File,
    type_guid: [u8; 16],
    name: &str,
    bytes: u64,
) -> Result<Entry, GptError> {
    let lbas = disk_lbas(file)?;
    let mut gpt = match read(file) {
        Ok(gpt) => gpt,
        Err(GptError::NoGpt) => {
            if lbas < ALIGN_LBAS + 2 * (ENTRY_LBAS + 2) {
                return Err(GptError::NoRoom(bytes));
            }
            Gpt {
                disk_guid: random_guid()?,
                entries: Vec::new(),
                first_usable: 2 + ENTRY_LBAS,
                last_usable: lbas - 2 - ENTRY_LBAS,
            }
        }
        Err(e) => return Err(e),
    };
    let slot = (0..ENTRIES as usize)
        .find(|i| gpt.entries.iter().all(|(used, _)| used != i))
        .ok_or(GptError::NoRoom(bytes))?;
    let after = gpt
        .entries
        .iter()
        .map(|(_, e)| e.last_lba + 1)
        .max()
        .unwrap_or(gpt.first_usable);
    let first_lba = after.div_ceil(ALIGN_LBAS) * ALIGN_LBAS;
    let count = bytes.div_ceil(1 << 20) * ((1 << 20) / LBA);
    let last_lba = first_lba + count - 1;
    if last_lba > gpt.last_usable {
        return Err(GptError::NoRoom(bytes));
    }
    let entry = Entry {
        type_guid,
        unique_guid: random_guid()?,
        first_lba,
        last_lba,
        attributes: 0,
        name: name.to_string(),
    };
    gpt.entries.push((slot, entry.clone()));
    write(file, &gpt, lbas)?;
    Ok(entry)
}

/// Writes `gpt` as the primary and backup tables of a `lbas`-LBA image (checksums computed
/// here).
pub(crate) fn write(file: &File, gpt: &Gpt, lbas: u64) -> Result<(), GptError> {
    let mut table = vec![0u8; (ENTRIES * ENTRY_SIZE) as usize];
    for (slot, e) in &gpt.entries {
        let b = &mut table[slot * ENTRY_SIZE as usize..(slot + 1) * ENTRY_SIZE as usize];
        b[0..16].copy_from_slice(&e.type_guid);
        b[16..32].copy_from_slice(&e.unique_guid);
        b[32..40].copy_from_slice(&e.first_lba.to_le_bytes());
        b[40..48].copy_from_slice(&e.last_lba.to_le_bytes());
        b[48..56].copy_from_slice(&e.attributes.to_le_bytes());
        for (i, unit) in e.name.encode_utf16().take(36).enumerate() {
            b[56 + 2 * i..58 + 2 * i].copy_from_slice(&unit.to_le_bytes());
        }
    }
    let table_crc = crc32fast::hash(&table);
    let last = lbas - 1;
    let header = |my: u64, alternate: u64, entries_at: u64| {
        let mut h = [0u8; LBA as usize];
        h[0..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&my.to_le_bytes());
        h[32..40].copy_from_slice(&alternate.to_le_bytes());
        h[40..48].copy_from_slice(&gpt.first_usable.to_le_bytes());
        h[48..56].copy_from_slice(&gpt.last_usable.to_le_bytes());
        h[56..72].copy_from_slice(&gpt.disk_guid);
        h[72..80].copy_from_slice(&entries_at.to_le_bytes());
        h[80..84].copy_from_slice(&ENTRIES.to_le_bytes());
        h[84..88].copy_from_slice(&ENTRY_SIZE.to_le_bytes());
        h[88..92].copy_from_slice(&table_crc.to_le_bytes());
        let crc = crc32fast::hash(&h[..92]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    };
    let mut mbr = [0u8; LBA as usize];
    file.read_exact_at(&mut mbr, 0)
        .map_err(|e| GptError::Io("read", e))?;
    let pe = &mut mbr[446..462];
    pe.fill(0);
    pe[1..4].copy_from_slice(&[0x00, 0x02, 0x00]);
    pe[4] = 0xEE;
    pe[5..8].copy_from_slice(&[0xFF, 0xFF, 0xFF]);
    pe[8..12].copy_from_slice(&1u32.to_le_bytes());
    pe[12..16].copy_from_slice(&(u32::try_from(lbas - 1).unwrap_or(u32::MAX)).to_le_bytes());
    mbr[462..510].fill(0);
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    let io = |what| move |e| GptError::Io(what, e);
    file.write_all_at(&table, 2 * LBA).map_err(io("write"))?;
    file.write_all_at(&table, (last - ENTRY_LBAS) * LBA)
        .map_err(io("write"))?;
    file.write_all_at(&header(last, 1, last - ENTRY_LBAS), last * LBA)
        .map_err(io("write"))?;
    file.write_all_at(&header(1, last, 2), LBA)
        .map_err(io("write"))?;
    file.write_all_at(&mbr, 0).map_err(io("write"))?;
    file.sync_data().map_err(io("sync"))
}
