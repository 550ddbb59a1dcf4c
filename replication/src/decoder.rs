//! Turning bytes from a connection into [`Message`]s: [`Decoder`] for bytes that arrive in
//! pieces of any size, [`read_message`] for a blocking reader. Both check a frame's header
//! before they buffer its body (a length over the limit is refused at once, never
//! allocated) and refuse a frame whose CRC or content does not check out; after the first
//! refusal a [`Decoder`] refuses everything, because nothing after a bad frame can be
//! trusted to start at a frame boundary.

use crate::wire::{self, Message, WireError, FRAME_HEADER_LEN};
use std::io::{self, Read};

/// Why a stream of bytes did not decode.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// A frame was refused.
    #[error("bad frame at byte {at} of the stream")]
    Wire {
        /// Where the frame started, counted from the start of the stream.
        at: u64,
        /// Why.
        #[source]
        source: WireError,
    },
    /// The connection ended in the middle of a frame.
    #[error("the connection ended in the middle of a frame ({have} of {want} bytes)")]
    Truncated {
        /// Bytes of the frame that arrived.
        have: usize,
        /// Bytes the frame has.
        want: usize,
    },
    /// Reading failed.
    #[error("reading the replication connection failed")]
    Io(#[source] io::Error),
}

/// A streaming decoder: [`Decoder::feed`] bytes as they arrive, take messages with
/// [`Decoder::next_message`].
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already decoded.
    start: usize,
    /// Stream offset of `buf[0]`.
    base: u64,
    failed: Option<(u64, WireError)>,
}

impl Decoder {
    /// An empty decoder at the start of a stream.
    pub fn new() -> Self {
        Decoder::default()
    }

    /// Adds bytes that arrived.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.base += self.start as u64;
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message, `None` when more bytes are needed, or the refusal.
    pub fn next_message(&mut self) -> Result<Option<Message>, DecodeError> {
        if let Some((at, source)) = &self.failed {
            return Err(DecodeError::Wire {
                at: *at,
                source: source.clone(),
            });
        }
        let at = self.base + self.start as u64;
        let pending = &self.buf[self.start..];
        let Some(header_bytes) = pending.first_chunk::<FRAME_HEADER_LEN>() else {
            return Ok(None);
        };
        let header = match wire::decode_frame_header(header_bytes) {
            Ok(header) => header,
            Err(source) => return Err(self.fail(at, source)),
        };
        let frame_len = FRAME_HEADER_LEN + header.body_len as usize;
        if pending.len() < frame_len {
            return Ok(None);
        }
        let body = pending[FRAME_HEADER_LEN..frame_len].to_vec();
        match wire::decode_body(header_bytes, header, body) {
            Ok(message) => {
                self.start += frame_len;
                Ok(Some(message))
            }
            Err(source) => Err(self.fail(at, source)),
        }
    }

    /// Bytes fed but not yet part of a whole message (what a connection that ends now
    /// leaves unread).
    pub fn pending_bytes(&self) -> usize {
        self.buf.len() - self.start
    }

    fn fail(&mut self, at: u64, source: WireError) -> DecodeError {
        self.failed = Some((at, source.clone()));
        self.buf = Vec::new();
        self.start = 0;
        DecodeError::Wire { at, source }
    }
}

/// Reads one message from a blocking reader; `Ok(None)` when the connection ended cleanly
/// between frames.
pub fn read_message(reader: &mut impl Read) -> Result<Option<Message>, DecodeError> {
    let mut header_bytes = [0u8; FRAME_HEADER_LEN];
    let got = read_full(reader, &mut header_bytes)?;
    if got == 0 {
        return Ok(None);
    }
    if got < FRAME_HEADER_LEN {
        return Err(DecodeError::Truncated {
            have: got,
            want: FRAME_HEADER_LEN,
        });
    }
    let wire_err = |source| DecodeError::Wire { at: 0, source };
    let header = wire::decode_frame_header(&header_bytes).map_err(wire_err)?;
    let mut body = vec![0u8; header.body_len as usize];
    let got = read_full(reader, &mut body)?;
    if got < body.len() {
        return Err(DecodeError::Truncated {
            have: FRAME_HEADER_LEN + got,
            want: FRAME_HEADER_LEN + body.len(),
        });
    }
    wire::decode_body(&header_bytes, header, body)
        .map(Some)
        .map_err(wire_err)
}

/// Fills `buf` as far as the reader goes; returns how many bytes it got.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> Result<usize, DecodeError> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(DecodeError::Io(e)),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Hello, Mode, ShippedRecord};
    use sealvm_journal::{RecordKind, Uuid};

    fn stream() -> (Vec<Message>, Vec<u8>) {
        let messages = vec![
            Message::Hello(Hello {
                journal: Uuid([1; 16]),
                volume: Uuid([2; 16]),
                volume_bytes: 1 << 20,
                sector_bytes: 512,
                mode: Mode::Synchronous,
                name: "v".into(),
            }),
            Message::Record(ShippedRecord {
                kind: RecordKind::Write,
                seq: 1,
                time_ns: 5,
                offset: 512,
                payload: vec![7; 4096],
            }),
            Message::Commit { seq: 1 },
        ];
        let bytes = messages.iter().flat_map(Message::encode).collect();
        (messages, bytes)
    }

    #[test]
    fn messages_come_out_whatever_the_pieces_the_bytes_arrive_in() {
        let (messages, bytes) = stream();
        for piece in [1, 3, 16, 17, 1000, bytes.len()] {
            let mut decoder = Decoder::new();
            let mut out = Vec::new();
            for chunk in bytes.chunks(piece) {
                decoder.feed(chunk);
                while let Some(message) = decoder.next_message().unwrap() {
                    out.push(message);
                }
            }
            assert_eq!(out, messages, "pieces of {piece}");
            assert_eq!(decoder.pending_bytes(), 0);
        }
    }

    #[test]
    fn after_a_bad_frame_nothing_more_is_decoded() {
        let (_, mut bytes) = stream();
        let second = FRAME_HEADER_LEN + 46 + 1;
        bytes[second + 20] ^= 1;
        let mut decoder = Decoder::new();
        decoder.feed(&bytes);
        assert!(matches!(
            decoder.next_message(),
            Ok(Some(Message::Hello(_)))
        ));
        let err = decoder.next_message().unwrap_err();
        assert!(
            matches!(err, DecodeError::Wire { at, .. } if at == second as u64),
            "{err}"
        );
        decoder.feed(&Message::Commit { seq: 1 }.encode());
        assert!(decoder.next_message().is_err());
    }

    #[test]
    fn a_blocking_reader_tells_a_clean_end_from_a_cut_frame() {
        let (messages, bytes) = stream();
        let mut reader = &bytes[..];
        for message in &messages {
            assert_eq!(read_message(&mut reader).unwrap().as_ref(), Some(message));
        }
        assert!(read_message(&mut reader).unwrap().is_none());
        let mut cut = &bytes[..bytes.len() - 3];
        read_message(&mut cut).unwrap();
        read_message(&mut cut).unwrap();
        assert!(matches!(
            read_message(&mut cut),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn a_huge_length_is_refused_before_any_body_arrives() {
        let mut header = Message::Commit { seq: 1 }.encode()[..FRAME_HEADER_LEN].to_vec();
        header[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut decoder = Decoder::new();
        decoder.feed(&header);
        assert!(matches!(
            decoder.next_message(),
            Err(DecodeError::Wire {
                source: WireError::TooLong(_),
                ..
            })
        ));
    }
}
