//! The ACPI tables a guest finds its hardware through: RSDP → XSDT → FADT (hardware-reduced,
//! with sleep control/status and reset registers) → DSDT, and the MADT. The DSDT describes
//! COM1, every virtio-mmio device as `LNRO0005` (the only way a stock kernel's virtio_mmio
//! driver finds devices) and, for trusted launch, the TPM CRB device `MSFT0101`.

use super::layout::*;
use super::memory::GuestMemory;
use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

const OEM_ID: [u8; 6] = *b"SEALVM";

/// One virtio-mmio device as the DSDT lists it.
#[derive(Debug, Clone, Copy)]
pub struct MmioDeviceInfo {
    /// Base of its 4 KiB window.
    pub base: u64,
    /// Its GSI.
    pub gsi: u32,
}

/// What the tables describe.
#[derive(Debug, Clone)]
pub struct AcpiConfig {
    /// Number of vCPUs.
    pub vcpus: u8,
    /// The virtio-mmio devices, in order.
    pub mmio_devices: Vec<MmioDeviceInfo>,
    /// A TPM CRB device at [`TPM_CRB_START`].
    pub tpm_crb: bool,
}

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// They do not fit below 1 MiB.
    #[error("ACPI tables ({0} bytes) do not fit in the reserved area")]
    TooBig(usize),
    /// Guest memory refused the write.
    #[error("cannot write the ACPI tables into guest memory")]
    Write,
}

fn bytes(table: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    table.to_aml_bytes(&mut out);
    out
}

/// The DSDT's AML body.
pub fn dsdt_body(config: &AcpiConfig) -> Vec<u8> {
    let mut body = Vec::new();
    // \_S5_: the sleep type a guest writes to the sleep control register to power off.
    let s5_type = S5_SLEEP_TYPE;
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&s5_type, &0u8, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut body);

    let com1 = bytes(&aml::Device::new(
        "COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &0u8),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(COM1_PORT, COM1_PORT, 1, 8),
                    &aml::Interrupt::new(true, true, false, false, COM1_GSI),
                ]),
            ),
        ],
    ));

    let mut virtio = Vec::new();
    for (i, device) in config.mmio_devices.iter().enumerate() {
        let uid = i as u32;
        let name = format!("V{i:03X}");
        virtio.push(bytes(&aml::Device::new(
            name.as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &uid),
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::Memory32Fixed::new(true, device.base as u32, VIRTIO_MMIO_SIZE as u32),
                        &aml::Interrupt::new(true, true, false, false, device.gsi),
                    ]),
                ),
            ],
        )));
    }
    let tpm = config.tpm_crb.then(|| {
        bytes(&aml::Device::new(
            "TPM2".into(),
            vec![
                &aml::Name::new("_HID".into(), &"MSFT0101"),
                &aml::Name::new("_STA".into(), &0xfu8),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![&aml::Memory32Fixed::new(
                        true,
                        TPM_CRB_START as u32,
                        TPM_CRB_SIZE as u32,
                    )]),
                ),
            ],
        ))
    });
    let raw: Vec<RawAml> = std::iter::once(com1)
        .chain(virtio)
        .chain(tpm)
        .map(RawAml)
        .collect();
    let mut children: Vec<&dyn Aml> = Vec::new();
    children.extend(raw.iter().map(|r| r as &dyn Aml));
    aml::Scope::new("_SB_".into(), children).to_aml_bytes(&mut body);
    body
}

/// AML already serialized.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// Builds every table and writes them at [`ACPI_START`]; returns the RSDP address.
pub fn write_tables(mem: &GuestMemory, config: &AcpiConfig) -> Result<u64, AcpiError> {
    let align = |a: u64| (a + 15) & !15;
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    // The XSDT holds FADT, MADT and, with a TPM, TPM2.
    let entries = if config.tpm_crb { 3 } else { 2 };
    let xsdt_len = 36 + 8 * entries;
    let fadt_addr = align(xsdt_addr + xsdt_len);
    let madt_addr = align(fadt_addr + acpi_tables::fadt::FADT::len() as u64);

    let mut madt = MADT::new(
        OEM_ID,
        *b"SEALVMAP",
        1,
        LocalInterruptController::Address(APIC_START as u32),
    );
    for cpu in 0..config.vcpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    let madt = bytes(&madt);
    let dsdt_addr = align(madt_addr + madt.len() as u64);

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"SEALVMDS", 1);
    dsdt.append_slice(&dsdt_body(config));
    let dsdt = dsdt.as_slice().to_vec();
    let tpm2 = config.tpm_crb.then(crate::vm::devices::tpm_crb::tpm2_table);
    let tpm2_addr = align(dsdt_addr + dsdt.len() as u64);

    let mut fadt = FADTBuilder::new(OEM_ID, *b"SEALVMFA", 1)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.sleep_control_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        ACPI_SLEEP_CONTROL_PORT.into(),
    );
    fadt.sleep_status_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        ACPI_SLEEP_STATUS_PORT.into(),
    );
    fadt.reset_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        ACPI_RESET_PORT.into(),
    );
    fadt.reset_value = ACPI_RESET_VALUE;
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"SEALVM\0\0").into();
    let fadt = bytes(&fadt.finalize());

    let mut xsdt = XSDT::new(OEM_ID, *b"SEALVMXS", 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    if tpm2.is_some() {
        xsdt.add_entry(tpm2_addr);
    }
    let xsdt = bytes(&xsdt);
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    let end = tpm2_addr + tpm2.as_ref().map_or(0, |t| t.len() as u64);
    if end > ACPI_END {
        return Err(AcpiError::TooBig((end - ACPI_START) as usize));
    }
    for (addr, data) in [
        (rsdp_addr, &rsdp),
        (xsdt_addr, &xsdt),
        (fadt_addr, &fadt),
        (madt_addr, &madt),
        (dsdt_addr, &dsdt),
    ] {
        mem.write_slice(data, GuestAddress(addr))
            .map_err(|_| AcpiError::Write)?;
    }
    if let Some(tpm2) = &tpm2 {
        mem.write_slice(tpm2, GuestAddress(tpm2_addr))
            .map_err(|_| AcpiError::Write)?;
    }
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn checksum_ok(table: &[u8]) -> bool {
        table.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_chain_from_the_rsdp_with_valid_checksums() {
        let mem = super::super::memory::create(16 << 20).unwrap();
        let config = AcpiConfig {
            vcpus: 2,
            mmio_devices: vec![
                MmioDeviceInfo {
                    base: virtio_mmio_base(0),
                    gsi: virtio_gsi(0),
                },
                MmioDeviceInfo {
                    base: virtio_mmio_base(1),
                    gsi: virtio_gsi(1),
                },
            ],
            tpm_crb: true,
        };
        let rsdp = write_tables(&mem, &config).unwrap();
        let mut head = [0u8; 36];
        mem.read_slice(&mut head, GuestAddress(rsdp)).unwrap();
        assert_eq!(&head[..8], b"RSD PTR ");
        assert!(checksum_ok(&head[..20]) && checksum_ok(&head));
        let xsdt = u64::from_le_bytes(head[24..32].try_into().unwrap());
        let read_table = |addr: u64| {
            let mut hdr = [0u8; 8];
            mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
            let len = u32::from_le_bytes(hdr[4..8].try_into().unwrap()) as usize;
            let mut t = vec![0u8; len];
            mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
            t
        };
        let x = read_table(xsdt);
        assert_eq!(&x[..4], b"XSDT");
        assert!(checksum_ok(&x));
        let mut signatures = Vec::new();
        for entry in x[36..].chunks(8) {
            let t = read_table(u64::from_le_bytes(entry.try_into().unwrap()));
            assert!(checksum_ok(&t), "{:?}", &t[..4]);
            signatures.push(t[..4].to_vec());
            if &t[..4] == b"FACP" {
                let dsdt = u64::from_le_bytes(t[140..148].try_into().unwrap());
                let d = read_table(dsdt);
                assert_eq!(&d[..4], b"DSDT");
                assert!(checksum_ok(&d));
                let text = String::from_utf8_lossy(&d);
                assert_eq!(text.matches("LNRO0005").count(), 2);
                assert!(text.contains("MSFT0101"));
                // Hardware-reduced, with the sleep control register at our port.
                let flags = u32::from_le_bytes(t[112..116].try_into().unwrap());
                assert_ne!(flags & (1 << 20), 0);
                assert_eq!(t[244], 1, "sleep control register is in I/O space");
                let port = u64::from_le_bytes(t[248..256].try_into().unwrap());
                assert_eq!(port, u64::from(ACPI_SLEEP_CONTROL_PORT));
            }
        }
        assert_eq!(
            signatures,
            vec![b"FACP".to_vec(), b"APIC".to_vec(), b"TPM2".to_vec()]
        );
    }

    /// The tables as ACPICA's disassembler reads them: every table decompiles without
    /// errors and the DSDT lists COM1, each virtio-mmio device with its window and
    /// interrupt, and the TPM. Needs `iasl` (acpica-tools, installed by `cargo xtask setup`).
    #[test]
    fn iasl_disassembles_every_table() {
        let mem = super::super::memory::create(16 << 20).unwrap();
        let config = AcpiConfig {
            vcpus: 2,
            mmio_devices: (0..3)
                .map(|i| MmioDeviceInfo {
                    base: virtio_mmio_base(i),
                    gsi: virtio_gsi(i),
                })
                .collect(),
            tpm_crb: true,
        };
        write_tables(&mem, &config).unwrap();
        let mut area = vec![0u8; (ACPI_END - ACPI_START) as usize];
        mem.read_slice(&mut area, GuestAddress(ACPI_START)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut dsl = std::collections::BTreeMap::new();
        let mut at = 48; // past the RSDP
        while at + 8 <= area.len() && area[at] != 0 {
            let signature = String::from_utf8_lossy(&area[at..at + 4]).to_string();
            let len = u32::from_le_bytes(area[at + 4..at + 8].try_into().unwrap()) as usize;
            let file = dir.path().join(format!("{}.dat", signature.to_lowercase()));
            std::fs::write(&file, &area[at..at + len]).unwrap();
            let out = std::process::Command::new("iasl")
                .arg("-d")
                .arg(&file)
                .current_dir(dir.path())
                .output()
                .expect("iasl (acpica-tools) must be installed: run cargo xtask setup");
            let log = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "iasl -d {signature} failed: {log}");
            let text = std::fs::read_to_string(file.with_extension("dsl")).unwrap_or_default();
            dsl.insert(signature, text);
            at = (at + len + 15) & !15;
        }
        assert_eq!(
            dsl.keys().cloned().collect::<Vec<_>>(),
            vec!["APIC", "DSDT", "FACP", "TPM2", "XSDT"]
        );
        let tpm2 = &dsl["TPM2"];
        assert!(tpm2.contains("Start Method : 07"), "{tpm2}");
        assert!(tpm2.contains("FED40040"), "{tpm2}");
        let dsdt = &dsl["DSDT"];
        assert_eq!(dsdt.matches("\"LNRO0005\"").count(), 3, "{dsdt}");
        assert!(dsdt.contains("0xD0002000"), "third window: {dsdt}");
        assert!(dsdt.contains("0x00000007"), "third GSI: {dsdt}");
        assert!(
            dsdt.contains("PNP0501") && dsdt.contains("MSFT0101"),
            "{dsdt}"
        );
        assert!(dsdt.contains("_S5_"), "{dsdt}");
        let fadt = &dsl["FACP"];
        assert!(fadt.contains("Hardware Reduced (V5) : 1"), "{fadt}");
        let madt = &dsl["APIC"];
        assert_eq!(madt.matches("Processor Local APIC").count(), 2, "{madt}");
        assert!(madt.contains("I/O APIC"), "{madt}");
    }
}
