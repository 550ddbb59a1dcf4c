//! Serves one frontend connection with inflight tracking.
//!
//! vhost-user-backend 0.24 keeps its request handler private and answers GET_INFLIGHT_FD
//! and SET_INFLIGHT_FD with an error. So the frontend's socket is read here: those two
//! messages are answered here, and every other message goes, byte for byte and with its
//! file descriptors, to the handler over a socket pair of connections made in a private
//! directory; the handler's replies come back the same way. SET_VRING_KICK is passed on
//! too, and then the queue is kicked once so it serves its inflight requests before the
//! guest kicks it (the guest may be waiting on exactly those requests, and send no kick).
//!
//! A vhost-user message is a 12-byte header (request, flags, payload size; little-endian
//! u32 each) and its payload; file descriptors travel with the header.

use super::{InflightError, InflightRegion, InflightSlots};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// `VHOST_USER_SET_VRING_KICK`.
const SET_VRING_KICK: u32 = 12;
/// `VHOST_USER_GET_INFLIGHT_FD`.
const GET_INFLIGHT_FD: u32 = 31;
/// `VHOST_USER_SET_INFLIGHT_FD`.
const SET_INFLIGHT_FD: u32 = 32;
/// Header flags: protocol version 1, and "this is a reply".
const REPLY_FLAGS: u32 = 0x1 | 0x4;
/// Header flag: the frontend wants an ack (REPLY_ACK).
const NEED_REPLY: u32 = 0x8;
/// Bytes of a message header.
const HEADER_SIZE: usize = 12;
/// Largest payload accepted; the largest vhost-user payloads are a few KiB.
pub(super) const MAX_PAYLOAD: usize = 64 << 10;
/// Most file descriptors one message carries.
const MAX_FDS: usize = 32;
/// Bytes of `VhostUserInflight` (u64 mmap_size, u64 mmap_offset, u16 num_queues,
/// u16 queue_size, padded to 8).
const INFLIGHT_PAYLOAD: usize = 24;

/// One vhost-user message.
pub(super) struct Message {
    header: [u8; HEADER_SIZE],
    pub(super) payload: Vec<u8>,
    files: Vec<File>,
}

impl Message {
    pub(super) fn request(&self) -> u32 {
        u32::from_le_bytes([
            self.header[0],
            self.header[1],
            self.header[2],
            self.header[3],
        ])
    }

    fn flags(&self) -> u32 {
        u32::from_le_bytes([
            self.header[4],
            self.header[5],
            self.header[6],
            self.header[7],
        ])
    }

    fn reply(request: u32, payload: Vec<u8>, files: Vec<File>) -> Self {
        let mut header = [0u8; HEADER_SIZE];
        header[0..4].copy_from_slice(&request.to_le_bytes());
        header[4..8].copy_from_slice(&REPLY_FLAGS.to_le_bytes());
        // Payloads built here are a few bytes.
        header[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        Message {
            header,
            payload,
            files,
        }
    }

    fn payload_u64(&self, offset: usize) -> Option<u64> {
        let bytes = self.payload.get(offset..offset + 8)?;
        Some(u64::from_le_bytes(bytes.try_into().ok()?))
    }

    fn payload_u16(&self, offset: usize) -> Option<u16> {
        let bytes = self.payload.get(offset..offset + 2)?;
        Some(u16::from_le_bytes(bytes.try_into().ok()?))
    }
}

fn io_error(what: &'static str) -> impl FnOnce(std::io::Error) -> InflightError {
    move |source| InflightError::Connection { what, source }
}

/// Reads one message; `None` when the peer closed the connection between messages.
pub(super) fn read_message(stream: &UnixStream) -> Result<Option<Message>, InflightError> {
    let mut header = [0u8; HEADER_SIZE];
    let mut files = Vec::new();
    let mut got = 0;
    while got < HEADER_SIZE {
        let mut fds = [0 as RawFd; MAX_FDS];
        let rest = &mut header[got..];
        let mut iov = [libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        }];
        // SAFETY: the iovec points at the unread part of `header`, which outlives the call
        // and may hold any bytes; `fds` has room for MAX_FDS descriptors.
        let received = unsafe { stream.recv_with_fds(&mut iov, &mut fds) };
        let (bytes, fd_count) = match received {
            Ok(counts) => counts,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => {
                return Err(InflightError::Connection {
                    what: "cannot read a message header",
                    source: std::io::Error::from_raw_os_error(e.errno()),
                })
            }
        };
        for fd in fds.iter().take(fd_count) {
            // SAFETY: recvmsg just created this descriptor for us; nothing else owns it.
            files.push(unsafe { File::from_raw_fd(*fd) });
        }
        if bytes == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(InflightError::Message(
                "the connection closed inside a header",
            ));
        }
        got += bytes;
    }
    let size = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if size > MAX_PAYLOAD {
        return Err(InflightError::Message("payload too large"));
    }
    let mut payload = vec![0u8; size];
    let mut reader = stream;
    reader
        .read_exact(&mut payload)
        .map_err(io_error("cannot read a message payload"))?;
    Ok(Some(Message {
        header,
        payload,
        files,
    }))
}

/// Writes one message with its file descriptors.
fn write_message(stream: &UnixStream, message: &Message) -> Result<(), InflightError> {
    let fds: Vec<RawFd> = message.files.iter().map(|f| f.as_raw_fd()).collect();
    let sent = loop {
        match stream.send_with_fds(&[&message.header[..], &message.payload[..]], &fds) {
            Ok(sent) => break sent,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => {
                return Err(InflightError::Connection {
                    what: "cannot write a message",
                    source: std::io::Error::from_raw_os_error(e.errno()),
                })
            }
        }
    };
    let mut bytes = message.header.to_vec();
    bytes.extend_from_slice(&message.payload);
    let mut writer = stream;
    writer
        .write_all(bytes.get(sent..).unwrap_or_default())
        .map_err(io_error("cannot write a message"))
}

/// A frontend connection being served; [`Connection::finish`] once the handler stopped.
pub struct Connection {
    frontend: UnixStream,
    handler: UnixStream,
    threads: Vec<JoinHandle<()>>,
}

impl Connection {
    /// Closes both sides and waits for the connection's threads.
    pub fn finish(self) {
        let _ = self.frontend.shutdown(std::net::Shutdown::Both);
        let _ = self.handler.shutdown(std::net::Shutdown::Both);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// A private directory for the socket between this connection and the handler: only this
/// user can reach it, and it is removed once the handler has accepted.
struct PrivateSocketDir(PathBuf);

impl PrivateSocketDir {
    fn create() -> Result<Self, InflightError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let mut last_error = None;
        for _ in 0..16 {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let dir = std::env::temp_dir().join(format!(
                "sealvm-blk-{}-{}-{nanos}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            // create() fails on a name that exists, so nobody else can own the directory.
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(PrivateSocketDir(dir)),
                Err(e) => last_error = Some(e),
            }
        }
        Err(InflightError::Connection {
            what: "cannot create a private socket directory",
            source: last_error.unwrap_or_else(|| std::io::Error::other("no attempt")),
        })
    }
}

impl Drop for PrivateSocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0.join("handler.sock"));
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Serves `frontend`: `attach` hands vhost-user-backend's daemon a listener on which this
/// connection's other end waits (`|l| daemon.start(l)`), then two threads carry messages
/// between the frontend and the daemon, answering the inflight messages from `slots`, a
/// device with queues of at most `max_queue_size` descriptors. The slots start empty: a
/// frontend that sends no region gets no tracking.
pub fn serve_connection(
    frontend: UnixStream,
    slots: Arc<InflightSlots>,
    max_queue_size: usize,
    attach: impl FnOnce(&mut vhost::vhost_user::Listener) -> std::io::Result<()>,
) -> Result<Connection, InflightError> {
    slots.install(None)?;
    let dir = PrivateSocketDir::create()?;
    let path = dir.0.join("handler.sock");
    let listener = UnixListener::bind(&path).map_err(io_error("cannot bind the handler socket"))?;
    let handler = UnixStream::connect(&path).map_err(io_error("cannot reach the handler"))?;
    let mut listener = vhost::vhost_user::Listener::from(listener);
    attach(&mut listener).map_err(io_error("the handler did not accept"))?;
    drop(listener);
    drop(dir);

    let writer = Arc::new(Mutex::new(
        frontend
            .try_clone()
            .map_err(io_error("cannot clone the frontend socket"))?,
    ));
    let to_handler = {
        let frontend = frontend
            .try_clone()
            .map_err(io_error("cannot clone the frontend socket"))?;
        let handler = handler
            .try_clone()
            .map_err(io_error("cannot clone the handler socket"))?;
        let writer = writer.clone();
        std::thread::Builder::new()
            .name("vhost-frontend".into())
            .spawn(move || {
                if let Err(error) =
                    frontend_to_handler(&frontend, &handler, &writer, &slots, max_queue_size)
                {
                    tracing::warn!(%error, "the frontend connection ended");
                }
                let _ = handler.shutdown(std::net::Shutdown::Both);
            })
            .map_err(io_error("cannot start a connection thread"))?
    };
    let to_frontend = {
        let frontend = frontend
            .try_clone()
            .map_err(io_error("cannot clone the frontend socket"))?;
        let handler = handler
            .try_clone()
            .map_err(io_error("cannot clone the handler socket"))?;
        std::thread::Builder::new()
            .name("vhost-replies".into())
            .spawn(move || {
                if let Err(error) = handler_to_frontend(&handler, &writer) {
                    tracing::debug!(%error, "the handler connection ended");
                }
                let _ = frontend.shutdown(std::net::Shutdown::Both);
            })
            .map_err(io_error("cannot start a connection thread"))?
    };
    Ok(Connection {
        frontend,
        handler,
        threads: vec![to_handler, to_frontend],
    })
}

fn send_to_frontend(writer: &Mutex<UnixStream>, message: &Message) -> Result<(), InflightError> {
    let frontend = writer
        .lock()
        .map_err(|_| InflightError::Message("frontend writer poisoned"))?;
    write_message(&frontend, message)
}

fn handler_to_frontend(
    handler: &UnixStream,
    writer: &Mutex<UnixStream>,
) -> Result<(), InflightError> {
    while let Some(reply) = read_message(handler)? {
        send_to_frontend(writer, &reply)?;
    }
    Ok(())
}

fn frontend_to_handler(
    frontend: &UnixStream,
    handler: &UnixStream,
    writer: &Mutex<UnixStream>,
    slots: &InflightSlots,
    max_queue_size: usize,
) -> Result<(), InflightError> {
    while let Some(message) = read_message(frontend)? {
        match message.request() {
            GET_INFLIGHT_FD => {
                let reply = get_inflight_fd(&message, slots.len(), max_queue_size);
                send_to_frontend(writer, &reply)?;
            }
            SET_INFLIGHT_FD => {
                let wants_ack = message.flags() & NEED_REPLY != 0;
                let result = set_inflight_fd(message, slots, max_queue_size);
                if let Err(error) = &result {
                    tracing::warn!(%error, "refused the frontend's inflight region");
                }
                if wants_ack {
                    let status = u64::from(result.is_err());
                    let ack =
                        Message::reply(SET_INFLIGHT_FD, status.to_le_bytes().to_vec(), vec![]);
                    send_to_frontend(writer, &ack)?;
                }
            }
            SET_VRING_KICK => {
                let queue = message.payload_u64(0).map(|v| (v & 0xff) as usize);
                let kick = message.files.first().and_then(|f| f.try_clone().ok());
                write_message(handler, &message)?;
                // The queue (re)starts: it is kicked once, so it reads its region again and
                // serves the requests in flight and those the driver queued while no
                // sealvm-blk ran, without waiting for a kick the driver may never send.
                if let Some(queue) = queue {
                    if slots.restart(queue) {
                        if let Some(mut kick) = kick {
                            let _ = kick.write_all(&1u64.to_ne_bytes());
                        }
                    }
                }
            }
            _ => write_message(handler, &message)?,
        }
    }
    Ok(())
}

/// Answers GET_INFLIGHT_FD with a fresh region, or with an empty one (no tracking) if the
/// frontend asks for queues the device does not have.
fn get_inflight_fd(message: &Message, max_queues: usize, max_queue_size: usize) -> Message {
    let num_queues = message.payload_u16(16).unwrap_or(0);
    let queue_size = message.payload_u16(18).unwrap_or(0);
    let created =
        if usize::from(num_queues) > max_queues || usize::from(queue_size) > max_queue_size {
            Err(InflightError::Shape {
                num_queues,
                queue_size,
            })
        } else {
            InflightRegion::create(num_queues, queue_size)
        };
    let mut payload = vec![0u8; INFLIGHT_PAYLOAD];
    payload[16..18].copy_from_slice(&num_queues.to_le_bytes());
    payload[18..20].copy_from_slice(&queue_size.to_le_bytes());
    match created {
        Ok((_region, file)) => {
            let size = usize::from(num_queues) * super::region::queue_area_size(queue_size);
            payload[0..8].copy_from_slice(&(size as u64).to_le_bytes());
            tracing::info!(num_queues, queue_size, "created an inflight region");
            Message::reply(GET_INFLIGHT_FD, payload, vec![file])
        }
        Err(error) => {
            // A size of 0 tells the frontend to go on without inflight tracking.
            tracing::warn!(%error, "no inflight region for the frontend");
            Message::reply(GET_INFLIGHT_FD, payload, vec![])
        }
    }
}

/// Installs the region the frontend sent with SET_INFLIGHT_FD.
fn set_inflight_fd(
    message: Message,
    slots: &InflightSlots,
    max_queue_size: usize,
) -> Result<(), InflightError> {
    let (Some(mmap_size), Some(mmap_offset), Some(num_queues), Some(queue_size)) = (
        message.payload_u64(0),
        message.payload_u64(8),
        message.payload_u16(16),
        message.payload_u16(18),
    ) else {
        return Err(InflightError::Message("SET_INFLIGHT_FD payload too short"));
    };
    let Some(file) = message.files.into_iter().next() else {
        return Err(InflightError::Message("SET_INFLIGHT_FD without a file"));
    };
    let region = InflightRegion::open(
        file,
        mmap_offset,
        mmap_size,
        num_queues,
        queue_size,
        slots.len(),
        max_queue_size,
    )?;
    slots.install(Some(region))?;
    tracing::info!(
        num_queues,
        queue_size,
        "the frontend sent its inflight region"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(request: u32, flags: u32, payload: Vec<u8>, files: Vec<File>) -> Message {
        let mut message = Message::reply(request, payload, files);
        message.header[4..8].copy_from_slice(&(0x1 | flags).to_le_bytes());
        message
    }

    fn inflight_payload(size: u64, offset: u64, queues: u16, queue_size: u16) -> Vec<u8> {
        let mut p = vec![0u8; INFLIGHT_PAYLOAD];
        p[0..8].copy_from_slice(&size.to_le_bytes());
        p[8..16].copy_from_slice(&offset.to_le_bytes());
        p[16..18].copy_from_slice(&queues.to_le_bytes());
        p[18..20].copy_from_slice(&queue_size.to_le_bytes());
        p
    }

    #[test]
    fn messages_keep_their_bytes_and_files_across_a_socket() {
        let (a, b) = UnixStream::pair().expect("pair");
        let (file, _dir) = {
            let dir = std::env::temp_dir();
            let path = dir.join(format!("sealvm-blk-msg-test-{}", std::process::id()));
            std::fs::write(&path, b"payload file").expect("write");
            let file = File::open(&path).expect("open");
            std::fs::remove_file(&path).expect("remove");
            (file, dir)
        };
        let sent = request(7, 0, vec![1, 2, 3, 4, 5], vec![file]);
        write_message(&a, &sent).expect("write");
        let got = read_message(&b).expect("read").expect("a message");
        assert_eq!(got.request(), 7);
        assert_eq!(got.payload, vec![1, 2, 3, 4, 5]);
        assert_eq!(got.files.len(), 1);
        let mut contents = String::new();
        let mut received = &got.files[0];
        received.read_to_string(&mut contents).expect("read file");
        assert_eq!(contents, "payload file");
        drop(a);
        assert!(read_message(&b).expect("eof").is_none());
    }

    #[test]
    fn an_oversized_or_truncated_message_is_an_error() {
        let (a, b) = UnixStream::pair().expect("pair");
        let mut header = [0u8; HEADER_SIZE];
        header[8..12].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        (&a).write_all(&header).expect("write");
        assert!(read_message(&b).is_err());
        let (a, b) = UnixStream::pair().expect("pair");
        (&a).write_all(&[1, 2, 3]).expect("write");
        drop(a);
        assert!(read_message(&b).is_err());
    }

    #[test]
    fn get_inflight_fd_creates_a_region_the_set_message_installs() {
        let slots = InflightSlots::new(2);
        let reply = get_inflight_fd(
            &request(GET_INFLIGHT_FD, 0, inflight_payload(0, 0, 2, 128), vec![]),
            2,
            256,
        );
        assert_eq!(reply.payload.len(), INFLIGHT_PAYLOAD);
        let size = reply.payload_u64(0).expect("size");
        assert_eq!(size, 2 * 2112);
        assert_eq!(reply.files.len(), 1);
        assert_eq!(reply.files[0].metadata().expect("metadata").len(), size);

        let file = reply.files[0].try_clone().expect("clone");
        set_inflight_fd(
            request(
                SET_INFLIGHT_FD,
                0,
                inflight_payload(size, 0, 2, 128),
                vec![file],
            ),
            &slots,
            256,
        )
        .expect("set");
        assert!(slots.lock(0).expect("slot").tracking.is_some());
        assert!(slots.lock(1).expect("slot").tracking.is_some());
        assert!(slots.restart(1));
    }

    #[test]
    fn a_region_for_queues_the_device_lacks_is_refused() {
        let reply = get_inflight_fd(
            &request(GET_INFLIGHT_FD, 0, inflight_payload(0, 0, 4, 128), vec![]),
            2,
            256,
        );
        assert_eq!(reply.payload_u64(0), Some(0), "size 0: no tracking");
        assert!(reply.files.is_empty());

        let slots = InflightSlots::new(1);
        let (_region, file) = InflightRegion::create(1, 128).expect("create");
        let short = request(SET_INFLIGHT_FD, 0, vec![0; 10], vec![file]);
        assert!(set_inflight_fd(short, &slots, 256).is_err());
        let no_file = request(
            SET_INFLIGHT_FD,
            0,
            inflight_payload(2112, 0, 1, 128),
            vec![],
        );
        assert!(set_inflight_fd(no_file, &slots, 256).is_err());
        assert!(
            slots.lock(0).expect("slot").tracking.is_none(),
            "nothing installed"
        );
    }
}
