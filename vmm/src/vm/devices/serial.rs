//! COM1: vm-superio's 8250 UART, its output to stdout, a file or a unix socket (which also
//! carries input to the guest), its interrupt an irqfd on GSI 4.

use super::BusDevice;
use sealvm_os::socket::RemoveOnDrop;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Where COM1's output goes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SerialTarget {
    /// The VMM's standard output.
    Stdout,
    /// Appended to a file.
    File(PathBuf),
    /// A unix socket sealvm listens on; one client at a time reads output and sends input.
    Socket(PathBuf),
    /// Discarded.
    Off,
}

impl TryFrom<String> for SerialTarget {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<SerialTarget> for String {
    fn from(target: SerialTarget) -> String {
        match target {
            SerialTarget::Stdout => "stdout".into(),
            SerialTarget::Off => "off".into(),
            SerialTarget::File(p) => format!("file={}", p.display()),
            SerialTarget::Socket(p) => format!("socket={}", p.display()),
        }
    }
}

impl std::str::FromStr for SerialTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdout" => Ok(SerialTarget::Stdout),
            "off" | "null" => Ok(SerialTarget::Off),
            _ => {
                if let Some(p) = s.strip_prefix("file=") {
                    Ok(SerialTarget::File(p.into()))
                } else if let Some(p) = s.strip_prefix("socket=") {
                    Ok(SerialTarget::Socket(p.into()))
                } else {
                    Err(format!(
                        "bad serial target {s:?}: use stdout, off, file=PATH or socket=PATH"
                    ))
                }
            }
        }
    }
}

/// The irqfd that raises COM1's interrupt.
pub struct IrqTrigger(pub Arc<EventFd>);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Output of the UART.
pub enum SerialOutput {
    /// Standard output.
    Stdout(std::io::Stdout),
    /// A file.
    File(File),
    /// The current client of a socket, if any.
    Socket(Arc<Mutex<Option<UnixStream>>>),
    /// Nowhere.
    Off,
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            SerialOutput::Stdout(s) => s.write(buf),
            SerialOutput::File(f) => f.write(buf),
            SerialOutput::Socket(client) => {
                if let Ok(mut guard) = client.lock() {
                    if let Some(stream) = guard.as_mut() {
                        if stream.write_all(buf).is_err() {
                            *guard = None;
                        }
                    }
                }
                Ok(buf.len())
            }
            SerialOutput::Off => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            SerialOutput::Stdout(s) => s.flush(),
            SerialOutput::File(f) => f.flush(),
            _ => Ok(()),
        }
    }
}

/// COM1 on the port bus.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, SerialOutput>,
}

impl SerialDevice {
    /// A UART raising `irq`, writing to `target`; for a socket target, also the guard that
    /// removes the socket file (the caller keeps it while the VM runs: the device itself
    /// lives as long as its accept thread, which is as long as the process).
    pub fn new(
        irq: Arc<EventFd>,
        target: &SerialTarget,
    ) -> std::io::Result<(Arc<Mutex<Self>>, Option<RemoveOnDrop>)> {
        let (output, listener) = match target {
            SerialTarget::Stdout => (SerialOutput::Stdout(std::io::stdout()), None),
            SerialTarget::Off => (SerialOutput::Off, None),
            SerialTarget::File(path) => (
                SerialOutput::File(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)?,
                ),
                None,
            ),
            SerialTarget::Socket(path) => {
                let (listener, socket_file) = bind_socket(path)?;
                let client = Arc::new(Mutex::new(None));
                (
                    SerialOutput::Socket(client.clone()),
                    Some((listener, client, socket_file)),
                )
            }
        };
        let device = Arc::new(Mutex::new(SerialDevice {
            uart: Serial::new(IrqTrigger(irq), output),
        }));
        let socket_file = match listener {
            Some((listener, client, socket_file)) => {
                let device = device.clone();
                std::thread::Builder::new()
                    .name("serial-socket".into())
                    .spawn(move || accept_loop(listener, client, device))?;
                Some(socket_file)
            }
            None => None,
        };
        Ok((device, socket_file))
    }
}

/// Binds a unix socket at `path` with [`sealvm_os::socket::bind_removing`]: a file that is
/// not a socket and a socket another process serves are refused (the error says which), a
/// stale socket file is replaced. The guard removes the socket file when dropped.
pub fn bind_socket(path: &Path) -> std::io::Result<(UnixListener, RemoveOnDrop)> {
    sealvm_os::socket::bind_removing(path).map_err(std::io::Error::other)
}

fn accept_loop(
    listener: UnixListener,
    client: Arc<Mutex<Option<UnixStream>>>,
    device: Arc<Mutex<SerialDevice>>,
) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let Ok(reader) = stream.try_clone() else {
            continue;
        };
        if let Ok(mut c) = client.lock() {
            *c = Some(stream);
        }
        let device = device.clone();
        let _ = std::thread::Builder::new()
            .name("serial-input".into())
            .spawn(move || input_loop(reader, device));
    }
}

fn input_loop(mut reader: UnixStream, device: Arc<Mutex<SerialDevice>>) {
    let mut buf = [0u8; 64];
    loop {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let mut offset = 0;
                while offset < n {
                    let queued = device
                        .lock()
                        .ok()
                        .and_then(|mut d| d.uart.enqueue_raw_bytes(&buf[offset..n]).ok())
                        .unwrap_or(0);
                    offset += queued;
                    if queued == 0 {
                        // The FIFO is full until the guest reads: wait a little.
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                }
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(first), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(offset)) = (data.first(), u8::try_from(offset)) {
            if let Err(error) = self.uart.write(offset, value) {
                tracing::debug!(?error, "serial write failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_junk_is_refused() {
        assert_eq!(
            "stdout".parse::<SerialTarget>().unwrap(),
            SerialTarget::Stdout
        );
        assert_eq!(
            "file=/tmp/x".parse::<SerialTarget>().unwrap(),
            SerialTarget::File("/tmp/x".into())
        );
        assert!("tty".parse::<SerialTarget>().is_err());
    }

    #[test]
    fn bytes_written_to_thr_reach_the_file_and_raise_the_interrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let irq = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let (device, _) =
            SerialDevice::new(irq.clone(), &SerialTarget::File(path.clone())).unwrap();
        let mut d = device.lock().unwrap();
        d.write(1, &[0x02]); // IER: THR empty interrupt
        for b in b"hi\n" {
            d.write(0, &[*b]);
        }
        d.uart.writer_mut().flush().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"hi\n");
        assert!(irq.read().unwrap() >= 1);
    }
}
