//! A TPM 2.0 Command Response Buffer (CRB) interface, as the TCG PC Client Platform TPM
//! Profile defines it and QEMU's tpm-crb and cloud-hypervisor provide: the guest writes a
//! command into the buffer and sets CTRL_START; sealvm forwards it to the guest's swtpm over
//! its data socket and puts the response in the same buffer. Locality 0 only.

use super::BusDevice;
use crate::vm::layout::TPM_CRB_START;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

const LOC_STATE: u64 = 0x00;
const LOC_CTRL: u64 = 0x08;
const LOC_STS: u64 = 0x0c;
const INTF_ID_LO: u64 = 0x30;
const INTF_ID_HI: u64 = 0x34;
const CTRL_REQ: u64 = 0x40;
const CTRL_STS: u64 = 0x44;
const CTRL_CANCEL: u64 = 0x48;
const CTRL_START: u64 = 0x4c;
const CTRL_CMD_SIZE: u64 = 0x58;
const CTRL_CMD_LADDR: u64 = 0x5c;
const CTRL_CMD_HADDR: u64 = 0x60;
const CTRL_RSP_SIZE: u64 = 0x64;
const CTRL_RSP_LADDR: u64 = 0x68;
const CTRL_RSP_HADDR: u64 = 0x6c;
/// The command/response buffer.
pub const DATA_BUFFER: u64 = 0x80;
/// Size of the buffer (the rest of the first 4 KiB page).
pub const BUFFER_SIZE: usize = 0x1000 - DATA_BUFFER as usize;

const LOC_STATE_ESTABLISHED: u32 = 1 << 0;
const LOC_STATE_ASSIGNED: u32 = 1 << 1;
const LOC_STATE_REG_VALID: u32 = 1 << 7;
const CTRL_STS_ERROR: u32 = 1 << 0;
const CTRL_STS_IDLE: u32 = 1 << 1;
/// InterfaceType CRB, version 1, 64-byte transfers, CapCRB, InterfaceSelector CRB.
const INTF_ID: u32 = 1 | (1 << 4) | (3 << 11) | (1 << 14) | (1 << 17);
/// Vendor and device id reported in INTF_ID's upper half.
const VID_DID: u32 = 0x0001_1014;

/// TPM_RC_FAILURE, answered when swtpm cannot be reached.
const TPM_RC_FAILURE: u32 = 0x101;

/// The CRB device.
pub struct TpmCrb {
    socket_path: PathBuf,
    socket: Option<UnixStream>,
    locality_granted: bool,
    idle: bool,
    error: bool,
    buffer: Vec<u8>,
    commands: u64,
}

impl TpmCrb {
    /// A CRB forwarding to the swtpm data socket at `socket`.
    pub fn new(socket: &Path) -> Self {
        TpmCrb {
            socket_path: socket.to_path_buf(),
            socket: None,
            locality_granted: false,
            idle: true,
            error: false,
            buffer: vec![0; BUFFER_SIZE],
            commands: 0,
        }
    }

    /// Commands forwarded so far.
    pub fn commands(&self) -> u64 {
        self.commands
    }

    fn connect(&mut self) -> std::io::Result<&mut UnixStream> {
        if self.socket.is_none() {
            let stream = UnixStream::connect(&self.socket_path)?;
            stream.set_read_timeout(Some(Duration::from_secs(60)))?;
            self.socket = Some(stream);
        }
        Ok(self.socket.as_mut().expect("just connected"))
    }

    /// Sends the command in the buffer to swtpm and replaces it with the response.
    fn execute(&mut self) {
        let declared = u32::from_be_bytes([
            self.buffer[2],
            self.buffer[3],
            self.buffer[4],
            self.buffer[5],
        ]) as usize;
        if !(10..=BUFFER_SIZE).contains(&declared) {
            tracing::debug!(declared, "TPM command with a bad size from the guest");
            self.respond_error();
            return;
        }
        let command = self.buffer[..declared].to_vec();
        let result = self.connect().and_then(|s| {
            s.write_all(&command)?;
            let mut header = [0u8; 10];
            s.read_exact(&mut header)?;
            let size = u32::from_be_bytes([header[2], header[3], header[4], header[5]]) as usize;
            if !(10..=BUFFER_SIZE).contains(&size) {
                return Err(std::io::Error::other(format!("response of {size} bytes")));
            }
            let mut response = header.to_vec();
            response.resize(size, 0);
            s.read_exact(&mut response[10..])?;
            Ok(response)
        });
        match result {
            Ok(response) => {
                self.buffer[..response.len()].copy_from_slice(&response);
                self.commands += 1;
            }
            Err(error) => {
                tracing::error!(%error, socket = %self.socket_path.display(), "the guest's vTPM did not answer");
                self.socket = None;
                self.respond_error();
            }
        }
    }

    fn respond_error(&mut self) {
        let mut response = [0u8; 10];
        response[..2].copy_from_slice(&0x8001u16.to_be_bytes());
        response[2..6].copy_from_slice(&10u32.to_be_bytes());
        response[6..10].copy_from_slice(&TPM_RC_FAILURE.to_be_bytes());
        self.buffer[..10].copy_from_slice(&response);
        self.error = true;
    }

    fn register(&self, offset: u64) -> u32 {
        let base = TPM_CRB_START + DATA_BUFFER;
        match offset {
            LOC_STATE => {
                LOC_STATE_ESTABLISHED
                    | LOC_STATE_REG_VALID
                    | if self.locality_granted {
                        LOC_STATE_ASSIGNED
                    } else {
                        0
                    }
            }
            LOC_STS => u32::from(self.locality_granted),
            INTF_ID_LO => INTF_ID,
            INTF_ID_HI => VID_DID,
            CTRL_STS => {
                (if self.idle { CTRL_STS_IDLE } else { 0 })
                    | (if self.error { CTRL_STS_ERROR } else { 0 })
            }
            CTRL_CMD_SIZE | CTRL_RSP_SIZE => BUFFER_SIZE as u32,
            CTRL_CMD_LADDR | CTRL_RSP_LADDR => base as u32,
            CTRL_CMD_HADDR | CTRL_RSP_HADDR => (base >> 32) as u32,
            _ => 0,
        }
    }
}

impl BusDevice for TpmCrb {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= DATA_BUFFER && offset < DATA_BUFFER + BUFFER_SIZE as u64 {
            let at = (offset - DATA_BUFFER) as usize;
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.buffer.get(at + i).copied().unwrap_or(0xff);
            }
            return;
        }
        if offset >= 0x1000 {
            // Localities 1-4 are not implemented.
            data.fill(0xff);
            return;
        }
        // Registers are 32-bit; byte and 64-bit reads are served from the same values.
        let aligned = offset & !3;
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&self.register(aligned).to_le_bytes());
        bytes[4..].copy_from_slice(&self.register(aligned + 4).to_le_bytes());
        let shift = (offset - aligned) as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(shift + i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= DATA_BUFFER && offset < DATA_BUFFER + BUFFER_SIZE as u64 {
            let at = (offset - DATA_BUFFER) as usize;
            for (i, b) in data.iter().enumerate() {
                if let Some(slot) = self.buffer.get_mut(at + i) {
                    *slot = *b;
                }
            }
            return;
        }
        let mut value = [0u8; 4];
        for (i, b) in data.iter().take(4).enumerate() {
            value[i] = *b;
        }
        let value = u32::from_le_bytes(value);
        match offset {
            LOC_CTRL => {
                if value & 1 != 0 {
                    self.locality_granted = true;
                }
                if value & 2 != 0 {
                    self.locality_granted = false;
                }
            }
            CTRL_REQ => {
                if value & 1 != 0 {
                    self.idle = false; // cmdReady
                }
                if value & 2 != 0 {
                    self.idle = true; // goIdle
                }
            }
            CTRL_CANCEL => {}
            CTRL_START if value & 1 != 0 => {
                if !self.locality_granted {
                    tracing::debug!("TPM command without locality 0; running it anyway");
                }
                self.error = false;
                self.idle = false;
                self.execute();
            }
            _ => {}
        }
    }
}

/// The ACPI TPM2 table pointing at the CRB's control area (start method 7: CRB).
pub fn tpm2_table() -> Vec<u8> {
    let mut table = acpi_tables::sdt::Sdt::new(*b"TPM2", 52, 4, *b"SEALVM", *b"SEALVMTP", 1);
    table.write_u16(36, 0); // platform class: client
    table.write_u64(40, TPM_CRB_START + CTRL_REQ); // control area
    table.write_u32(48, 7); // start method: CRB
    table.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn get_random_command() -> Vec<u8> {
        vec![0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8]
    }

    /// A stand-in TPM that answers every command with a fixed 18-byte response: enough to
    /// check the register protocol; the real swtpm is exercised by the bundle boot test.
    fn fake_tpm(path: &Path) -> std::thread::JoinHandle<Vec<u8>> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut cmd = vec![0u8; 12];
            s.read_exact(&mut cmd).unwrap();
            let mut response = vec![0x80, 0x01, 0, 0, 0, 20, 0, 0, 0, 0, 0, 8];
            response.extend_from_slice(b"ABCDEFGH");
            s.write_all(&response).unwrap();
            cmd
        })
    }

    #[test]
    fn a_command_goes_to_the_tpm_and_the_response_comes_back_in_the_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tpm.sock");
        let tpm = fake_tpm(&path);
        let mut crb = TpmCrb::new(&path);
        crb.write(LOC_CTRL, &1u32.to_le_bytes());
        let mut v = [0u8; 4];
        crb.read(LOC_STS, &mut v);
        assert_eq!(u32::from_le_bytes(v) & 1, 1, "locality granted");
        crb.write(CTRL_REQ, &1u32.to_le_bytes());
        for (i, b) in get_random_command().iter().enumerate() {
            crb.write(DATA_BUFFER + i as u64, &[*b]);
        }
        crb.write(CTRL_START, &1u32.to_le_bytes());
        crb.read(CTRL_START, &mut v);
        assert_eq!(u32::from_le_bytes(v), 0, "START clears when done");
        assert_eq!(tpm.join().unwrap(), get_random_command());
        let mut response = [0u8; 20];
        crb.read(DATA_BUFFER, &mut response[..8]);
        crb.read(DATA_BUFFER + 8, &mut response[8..16]);
        crb.read(DATA_BUFFER + 16, &mut response[16..]);
        assert_eq!(&response[12..], b"ABCDEFGH");
        assert_eq!(crb.commands(), 1);
    }

    #[test]
    fn a_bad_size_or_a_missing_tpm_gets_a_tpm_failure_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let mut crb = TpmCrb::new(&dir.path().join("nobody.sock"));
        // Declared size larger than the buffer.
        crb.write(DATA_BUFFER, &[0x80, 0x01, 0xff, 0xff, 0xff, 0xff]);
        crb.write(CTRL_START, &1u32.to_le_bytes());
        let mut rc = [0u8; 4];
        crb.read(DATA_BUFFER + 6, &mut rc);
        assert_eq!(u32::from_be_bytes(rc), TPM_RC_FAILURE);
        // A well-formed command, but swtpm is not there.
        for (i, b) in get_random_command().iter().enumerate() {
            crb.write(DATA_BUFFER + i as u64, &[*b]);
        }
        crb.write(CTRL_START, &1u32.to_le_bytes());
        crb.read(DATA_BUFFER + 6, &mut rc);
        assert_eq!(u32::from_be_bytes(rc), TPM_RC_FAILURE);
        let mut sts = [0u8; 4];
        crb.read(CTRL_STS, &mut sts);
        assert_eq!(u32::from_le_bytes(sts) & CTRL_STS_ERROR, CTRL_STS_ERROR);
        // Reads past the buffer and in other localities do not panic.
        let mut big = [0u8; 8];
        crb.read(0xffc, &mut big);
        crb.read(0x4ff8, &mut big);
    }
}
