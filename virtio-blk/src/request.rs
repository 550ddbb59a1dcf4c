//! Parsing and executing one virtio-blk request (virtio 1.2, section 5.2.6).
//!
//! Wire layout of a request, as the driver places it in its descriptor chain:
//! a device-readable 16-byte header (`type` u32 LE, `reserved` u32, `sector` u64 LE), then
//! the data (device-readable for writes, discard and write-zeroes; device-writable for reads
//! and get-id), then one device-writable status byte. Discard and write-zeroes data is an
//! array of 16-byte segments (`sector` u64, `num_sectors` u32, `flags` u32; flag bit 0 is
//! "unmap", only meaningful for write-zeroes).
//!
//! The header and data may be split across descriptors in any way; all device-readable
//! descriptors must come before all device-writable ones.

use crate::backend::BlockBackend;
use crate::{DEVICE_ID_LEN, SECTOR_SHIFT, SECTOR_SIZE};
use std::io;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Request types (`type` field of the header).
pub mod types {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush the write cache.
    pub const FLUSH: u32 = 4;
    /// Get the device id.
    pub const GET_ID: u32 = 8;
    /// Discard sectors.
    pub const DISCARD: u32 = 11;
    /// Write zeroes to sectors.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status values written to the status byte.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// Device or driver error.
    pub const IOERR: u8 = 1;
    /// Request unsupported by the device.
    pub const UNSUPP: u8 = 2;
}

const HEADER_LEN: usize = 16;
const DISCARD_SEGMENT_LEN: u64 = 16;

/// One buffer of a descriptor chain, as the transport saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (the device fills it) rather than device-readable.
    pub writable: bool,
}

/// What the device accepts; requests beyond these limits are refused.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Capacity of the disk in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Most descriptors in one chain (seg_max plus header and status).
    pub max_segments: usize,
    /// Most data bytes in one read or write.
    pub max_data_bytes: u64,
    /// Most sectors in one discard or write-zeroes segment.
    pub max_discard_sectors: u32,
    /// Most discard or write-zeroes segments in one request.
    pub max_discard_segments: u32,
    /// Writes, discards and write-zeroes are refused.
    pub read_only: bool,
}

impl Limits {
    /// The most data bytes in one request, and so the largest segment (`size_max`).
    pub const MAX_DATA_BYTES: u64 = 4 << 20;

    /// Limits for a disk of `capacity_sectors`, with sealvm's defaults: 128 data segments,
    /// 4 MiB per request, 1 GiB per discard segment, 32 discard segments.
    pub fn for_capacity(capacity_sectors: u64, read_only: bool) -> Self {
        Limits {
            capacity_sectors,
            max_segments: 128 + 2,
            max_data_bytes: Self::MAX_DATA_BYTES,
            max_discard_sectors: (1 << 30) >> SECTOR_SHIFT,
            max_discard_segments: 32,
            read_only,
        }
    }
}

/// The operation a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// Read sectors into guest memory.
    In,
    /// Write sectors from guest memory.
    Out,
    /// Make every completed write durable.
    Flush,
    /// Return the device id.
    GetId,
    /// Discard sector ranges.
    Discard,
    /// Zero sector ranges.
    WriteZeroes,
}

impl RequestKind {
    /// The request's `type` value on the wire.
    pub fn wire_type(self) -> u32 {
        match self {
            RequestKind::In => types::IN,
            RequestKind::Out => types::OUT,
            RequestKind::Flush => types::FLUSH,
            RequestKind::GetId => types::GET_ID,
            RequestKind::Discard => types::DISCARD,
            RequestKind::WriteZeroes => types::WRITE_ZEROES,
        }
    }
}

/// Why a request was refused or failed. Each maps to the status the driver sees.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain has no device-writable byte for the status.
    #[error("descriptor chain has no device-writable status byte")]
    NoStatus,
    /// The chain has more descriptors than the device allows.
    #[error("descriptor chain has {count} descriptors, more than the {max} allowed")]
    TooManySegments {
        /// Descriptors in the chain.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    BadOrder,
    /// The readable part is shorter than the 16-byte header.
    #[error("request header is {len} bytes, shorter than 16")]
    HeaderTooShort {
        /// Bytes available for the header.
        len: u64,
    },
    /// Guest memory could not be read or written at the given range.
    #[error("guest memory access at {addr:#x}+{len} failed")]
    Memory {
        /// Guest-physical address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// The request type is not supported.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// The data buffers point the wrong way for the request type.
    #[error("{kind:?} request has data in the wrong direction")]
    WrongDirection {
        /// The request.
        kind: RequestKind,
    },
    /// Data length is not a whole number of sectors.
    #[error("data length {len} is not a multiple of 512")]
    NotSectorMultiple {
        /// The length.
        len: u64,
    },
    /// The request reaches past the end of the disk.
    #[error("sectors {sector}..+{sectors} reach past the disk's {capacity} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Sector count.
        sectors: u64,
        /// Disk capacity.
        capacity: u64,
    },
    /// The request is larger than the device allows.
    #[error("request of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Bytes asked for.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A discard or write-zeroes segment is malformed.
    #[error("discard/write-zeroes segment list is malformed: {0}")]
    BadDiscard(&'static str),
    /// A write to a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// The storage behind the disk failed.
    #[error("backend I/O failed")]
    Backend(#[source] io::Error),
}

impl RequestError {
    /// The status byte the driver sees for this error.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => status::UNSUPP,
            RequestError::Backend(e) if e.kind() == io::ErrorKind::Unsupported => status::UNSUPP,
            _ => status::IOERR,
        }
    }

    /// True when the error was caused by the guest (a malformed or out-of-range request)
    /// rather than by the host's storage.
    pub fn is_guest_error(&self) -> bool {
        !matches!(self, RequestError::Backend(_))
    }
}

/// A request that could not be parsed, with the status byte's address when it was found.
#[derive(Debug)]
pub struct Rejected {
    /// Why.
    pub error: RequestError,
    /// Where to write the status, if the chain had a status byte.
    pub status_addr: Option<u64>,
}

impl Rejected {
    /// Writes the error status when possible; returns the used length for the chain.
    pub fn answer<M: GuestMemory>(&self, mem: &M) -> u32 {
        match self.status_addr {
            Some(addr) => match mem.write_slice(&[self.error.status()], GuestAddress(addr)) {
                Ok(()) => 1,
                Err(_) => 0,
            },
            None => 0,
        }
    }
}

/// A parsed, validated virtio-blk request.
#[derive(Debug, Clone)]
pub struct Request {
    /// The operation.
    pub kind: RequestKind,
    /// First sector (reads and writes).
    pub sector: u64,
    /// The data buffers, header and status removed.
    pub data: Vec<Segment>,
    /// Total data bytes.
    pub data_len: u64,
    /// Guest address of the status byte.
    pub status_addr: u64,
}

impl Request {
    /// Parses and validates the request in `chain` against `limits`.
    pub fn parse<M: GuestMemory>(
        mem: &M,
        chain: &[Segment],
        limits: &Limits,
    ) -> Result<Request, Rejected> {
        let last = chain.last().filter(|s| s.writable && s.len > 0);
        let Some(last) = last else {
            return Err(Rejected {
                error: RequestError::NoStatus,
                status_addr: None,
            });
        };
        let status_addr = last.addr.checked_add(u64::from(last.len) - 1);
        let reject = |error| Rejected { error, status_addr };
        let Some(status_addr) = status_addr else {
            return Err(reject(RequestError::NoStatus));
        };
        if chain.len() > limits.max_segments {
            return Err(reject(RequestError::TooManySegments {
                count: chain.len(),
                max: limits.max_segments,
            }));
        }
        if chain.windows(2).any(|w| w[0].writable && !w[1].writable) {
            return Err(reject(RequestError::BadOrder));
        }

        // Carve the header off the front of the readable part.
        let mut header = [0u8; HEADER_LEN];
        let mut got = 0usize;
        let mut data = Vec::new();
        for (i, seg) in chain.iter().enumerate() {
            let mut seg = *seg;
            if i == chain.len() - 1 {
                seg.len -= 1; // the status byte
            }
            if !seg.writable && got < HEADER_LEN {
                let take = (HEADER_LEN - got).min(seg.len as usize);
                mem.read_slice(&mut header[got..got + take], GuestAddress(seg.addr))
                    .map_err(|_| {
                        reject(RequestError::Memory {
                            addr: seg.addr,
                            len: take as u64,
                        })
                    })?;
                got += take;
                seg.addr += take as u64;
                seg.len -= take as u32;
            }
            if seg.len > 0 {
                data.push(seg);
            }
        }
        if got < HEADER_LEN {
            return Err(reject(RequestError::HeaderTooShort { len: got as u64 }));
        }
        let request_type = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        let kind = match request_type {
            types::IN => RequestKind::In,
            types::OUT => RequestKind::Out,
            types::FLUSH => RequestKind::Flush,
            types::GET_ID => RequestKind::GetId,
            types::DISCARD => RequestKind::Discard,
            types::WRITE_ZEROES => RequestKind::WriteZeroes,
            other => return Err(reject(RequestError::Unsupported(other))),
        };
        let data_len: u64 = data.iter().map(|s| u64::from(s.len)).sum();
        let request = Request {
            kind,
            sector,
            data,
            data_len,
            status_addr,
        };
        request.validate(limits).map_err(reject)?;
        Ok(request)
    }

    fn validate(&self, limits: &Limits) -> Result<(), RequestError> {
        let wants_writable = matches!(self.kind, RequestKind::In | RequestKind::GetId);
        if self.data.iter().any(|s| s.writable != wants_writable) {
            return Err(RequestError::WrongDirection { kind: self.kind });
        }
        match self.kind {
            RequestKind::In | RequestKind::Out => {
                if self.kind == RequestKind::Out && limits.read_only {
                    return Err(RequestError::ReadOnly);
                }
                if self.data_len % SECTOR_SIZE != 0 {
                    return Err(RequestError::NotSectorMultiple { len: self.data_len });
                }
                if self.data_len > limits.max_data_bytes {
                    return Err(RequestError::TooLarge {
                        len: self.data_len,
                        max: limits.max_data_bytes,
                    });
                }
                check_range(self.sector, self.data_len >> SECTOR_SHIFT, limits)
            }
            RequestKind::Discard | RequestKind::WriteZeroes => {
                if limits.read_only {
                    return Err(RequestError::ReadOnly);
                }
                if self.data_len == 0 || self.data_len % DISCARD_SEGMENT_LEN != 0 {
                    return Err(RequestError::BadDiscard("length is not a multiple of 16"));
                }
                if self.data_len / DISCARD_SEGMENT_LEN > u64::from(limits.max_discard_segments) {
                    return Err(RequestError::BadDiscard("too many segments"));
                }
                Ok(())
            }
            RequestKind::Flush | RequestKind::GetId => Ok(()),
        }
    }

    /// Runs the request against `backend`, writes the status byte, and returns the used
    /// length for the chain (bytes the device wrote into guest memory). On error the status
    /// says so and the error is returned beside the used length for the caller to count.
    pub fn execute<M: GuestMemory, B: BlockBackend + ?Sized>(
        &self,
        mem: &M,
        backend: &B,
        limits: &Limits,
    ) -> (u32, Option<RequestError>) {
        let result = self.run(mem, backend, limits);
        let (status, written, error) = match result {
            Ok(written) => (status::OK, written, None),
            Err(e) => (e.status(), 0, Some(e)),
        };
        match mem.write_slice(&[status], GuestAddress(self.status_addr)) {
            Ok(()) => (written + 1, error),
            Err(_) => (
                0,
                error.or(Some(RequestError::Memory {
                    addr: self.status_addr,
                    len: 1,
                })),
            ),
        }
    }

    fn run<M: GuestMemory, B: BlockBackend + ?Sized>(
        &self,
        mem: &M,
        backend: &B,
        limits: &Limits,
    ) -> Result<u32, RequestError> {
        let offset = self.sector << SECTOR_SHIFT;
        match self.kind {
            RequestKind::In => {
                let mut buf = vec![0u8; self.data_len as usize];
                backend
                    .read_at(offset, &mut buf)
                    .map_err(RequestError::Backend)?;
                self.scatter(mem, &buf)?;
                Ok(self.data_len as u32)
            }
            RequestKind::Out => {
                let buf = self.gather(mem)?;
                backend
                    .write_at(offset, &buf)
                    .map_err(RequestError::Backend)?;
                Ok(0)
            }
            RequestKind::Flush => {
                backend.flush().map_err(RequestError::Backend)?;
                Ok(0)
            }
            RequestKind::GetId => {
                let mut id = [0u8; DEVICE_ID_LEN];
                let src = backend.device_id();
                let n = src.len().min(DEVICE_ID_LEN);
                id[..n].copy_from_slice(&src[..n]);
                let len = (self.data_len as usize).min(DEVICE_ID_LEN);
                self.scatter(mem, &id[..len])?;
                Ok(len as u32)
            }
            RequestKind::Discard | RequestKind::WriteZeroes => {
                let raw = self.gather(mem)?;
                for chunk in raw.chunks_exact(DISCARD_SEGMENT_LEN as usize) {
                    let sector = u64::from_le_bytes(chunk[0..8].try_into().expect("8 bytes"));
                    let sectors = u32::from_le_bytes(chunk[8..12].try_into().expect("4 bytes"));
                    let flags = u32::from_le_bytes(chunk[12..16].try_into().expect("4 bytes"));
                    let unmap = flags & 1 != 0;
                    if flags & !1 != 0 || (self.kind == RequestKind::Discard && unmap) {
                        return Err(RequestError::Unsupported(self.kind.wire_type()));
                    }
                    if sectors > limits.max_discard_sectors {
                        return Err(RequestError::BadDiscard("segment too large"));
                    }
                    check_range(sector, u64::from(sectors), limits)?;
                    let (at, len) = (sector << SECTOR_SHIFT, u64::from(sectors) << SECTOR_SHIFT);
                    let result = if self.kind == RequestKind::Discard {
                        backend.discard(at, len)
                    } else {
                        backend.write_zeroes(at, len, unmap)
                    };
                    result.map_err(RequestError::Backend)?;
                }
                Ok(0)
            }
        }
    }

    /// Reads the (device-readable) data buffers into one vector.
    pub fn gather<M: GuestMemory>(&self, mem: &M) -> Result<Vec<u8>, RequestError> {
        let mut buf = vec![0u8; self.data_len as usize];
        let mut at = 0usize;
        for seg in &self.data {
            let end = at + seg.len as usize;
            mem.read_slice(&mut buf[at..end], GuestAddress(seg.addr))
                .map_err(|_| RequestError::Memory {
                    addr: seg.addr,
                    len: u64::from(seg.len),
                })?;
            at = end;
        }
        Ok(buf)
    }

    /// Writes `bytes` across the (device-writable) data buffers, in order.
    pub fn scatter<M: GuestMemory>(&self, mem: &M, bytes: &[u8]) -> Result<(), RequestError> {
        let mut rest = bytes;
        for seg in &self.data {
            if rest.is_empty() {
                break;
            }
            let n = rest.len().min(seg.len as usize);
            mem.write_slice(&rest[..n], GuestAddress(seg.addr))
                .map_err(|_| RequestError::Memory {
                    addr: seg.addr,
                    len: n as u64,
                })?;
            rest = &rest[n..];
        }
        Ok(())
    }
}

fn check_range(sector: u64, sectors: u64, limits: &Limits) -> Result<(), RequestError> {
    match sector.checked_add(sectors) {
        Some(end) if end <= limits.capacity_sectors => Ok(()),
        _ => Err(RequestError::OutOfRange {
            sector,
            sectors,
            capacity: limits.capacity_sectors,
        }),
    }
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
