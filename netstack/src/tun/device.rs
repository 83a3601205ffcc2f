//! The smoltcp device of the TUN stack: the session's packet queues
//! ([`LinkDevice`](crate::device::LinkDevice)), with real checksums, because the other end
//! is the kernel.

use smoltcp::phy::{self, ChecksumCapabilities, DeviceCapabilities};
use smoltcp::time::Instant;

use crate::device::{LinkDevice, RxToken, TxToken};

pub(crate) struct TunDevice(pub LinkDevice);

impl phy::Device for TunDevice {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        self.0.receive(now)
    }

    fn transmit(&mut self, now: Instant) -> Option<TxToken<'_>> {
        self.0.transmit(now)
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = self.0.capabilities();
        // The kernel verifies what we send and may hand us anything: compute and check all.
        caps.checksum = ChecksumCapabilities::default();
        caps
    }
}
