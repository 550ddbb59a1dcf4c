//! Monotonic counters on the host TPM (TPM2 NV counters) for rollback protection: one per
//! bundle, owner-authorized, 8 bytes, defined when the bundle is created. A TPM counter only
//! goes up, and a counter defined anew starts at the highest value any counter on that TPM
//! has held, so undefining and redefining it cannot turn it back.

use super::{cmd, HostTpm, TpmError};
use tss_esapi::attributes::NvIndexAttributesBuilder;
use tss_esapi::constants::NvIndexType;
use tss_esapi::handles::{NvIndexHandle, NvIndexTpmHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::resource_handles::{NvAuth, Provision};
use tss_esapi::structures::NvPublicBuilder;

/// The first NV index sealvm tries for a bundle's counter (owner range 0x01xxxxxx).
pub const COUNTER_INDEX_BASE: u32 = 0x015E_A000;
/// How many indices after the preferred one are tried when some are taken.
const INDEX_TRIES: u32 = 64;

impl HostTpm {
    /// Defines a new NV counter near `preferred` (the first free index from it), increments
    /// it once (a counter is unreadable until then) and returns (index, value).
    pub fn define_counter(&mut self, preferred: u32) -> Result<(u32, u64), TpmError> {
        let attributes = NvIndexAttributesBuilder::new()
            .with_owner_write(true)
            .with_owner_read(true)
            .with_nv_index_type(NvIndexType::Counter)
            .build()
            .map_err(cmd("NV_DefineSpace"))?;
        let mut last_error = None;
        for offset in 0..INDEX_TRIES {
            let index = COUNTER_INDEX_BASE + (preferred.wrapping_add(offset) & 0xfff);
            let public = NvPublicBuilder::new()
                .with_nv_index(NvIndexTpmHandle::new(index).map_err(cmd("NV_DefineSpace"))?)
                .with_index_name_algorithm(HashingAlgorithm::Sha256)
                .with_index_attributes(attributes)
                .with_data_area_size(8)
                .build()
                .map_err(cmd("NV_DefineSpace"))?;
            match self.context.execute_with_nullauth_session(|ctx| {
                ctx.nv_define_space(Provision::Owner, None, public)
            }) {
                Ok(handle) => {
                    let value = self.increment_handle(handle)?;
                    return Ok((index, value));
                }
                // Most likely TPM_RC_NV_DEFINED: try the next index.
                Err(error) => last_error = Some(error),
            }
        }
        Err(TpmError::Command {
            command: "NV_DefineSpace",
            source: last_error.unwrap_or(tss_esapi::Error::WrapperError(
                tss_esapi::WrapperErrorKind::InvalidParam,
            )),
        })
    }

    /// The current value of the counter at `index`.
    pub fn read_counter(&mut self, index: u32) -> Result<u64, TpmError> {
        let handle = self.counter_handle(index)?;
        let result = self
            .context
            .execute_with_nullauth_session(|ctx| ctx.nv_read(NvAuth::Owner, handle, 8, 0));
        self.close(handle);
        let bytes = result.map_err(cmd("NV_Read"))?;
        let bytes: [u8; 8] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| TpmError::Malformed("NV counter is not 8 bytes"))?;
        Ok(u64::from_be_bytes(bytes))
    }

    /// Increments the counter at `index` by one and returns its new value.
    pub fn increment_counter(&mut self, index: u32) -> Result<u64, TpmError> {
        let handle = self.counter_handle(index)?;
        let result = self.increment_handle(handle);
        self.close(handle);
        result
    }

    fn increment_handle(&mut self, handle: NvIndexHandle) -> Result<u64, TpmError> {
        self.context
            .execute_with_nullauth_session(|ctx| ctx.nv_increment(NvAuth::Owner, handle))
            .map_err(cmd("NV_Increment"))?;
        let bytes = self
            .context
            .execute_with_nullauth_session(|ctx| ctx.nv_read(NvAuth::Owner, handle, 8, 0))
            .map_err(cmd("NV_Read"))?;
        let bytes: [u8; 8] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| TpmError::Malformed("NV counter is not 8 bytes"))?;
        Ok(u64::from_be_bytes(bytes))
    }

    fn counter_handle(&mut self, index: u32) -> Result<NvIndexHandle, TpmError> {
        let tpm_handle = NvIndexTpmHandle::new(index).map_err(cmd("TR_FromTPMPublic"))?;
        let object = self
            .context
            .execute_without_session(|ctx| ctx.tr_from_tpm_public(TpmHandle::NvIndex(tpm_handle)))
            .map_err(cmd("TR_FromTPMPublic"))?;
        Ok(NvIndexHandle::from(object))
    }

    fn close(&mut self, handle: NvIndexHandle) {
        let mut object = handle.into();
        let _ = self.context.tr_close(&mut object);
    }
}
