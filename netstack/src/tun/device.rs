//! The smoltcp device of the TUN stack: the session's packet queues
//! ([`LinkDevice`](crate::device::LinkDevice)), with the checksums the kernel needs, because
//! the other end is the kernel.

use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities};
use smoltcp::time::Instant;

use crate::device::{LinkDevice, RxToken, TxToken};

/// The link and what smoltcp computes and checks of each TCP segment.
pub(crate) struct TunDevice(pub LinkDevice, pub Checksum);

impl TunDevice {
    /// A device over `link`. smoltcp never verifies a TCP checksum here: `classify` has
    /// (or the driver said the kernel vouches for it). It computes one for what it sends
    /// unless `offload` leaves that to the kernel.
    pub(crate) fn new(link: LinkDevice, offload: bool) -> TunDevice {
        TunDevice(link, if offload { Checksum::None } else { Checksum::Tx })
    }
}

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
        // The kernel verifies what we send (unless offloaded, see `new`) and may hand us
        // anything: IP headers computed and checked, TCP as `new` says. Only TCP reaches
        // smoltcp (UDP and ICMP are answered by `packet`).
        caps.checksum = ChecksumCapabilities::default();
        caps.checksum.tcp = self.1;
        caps
    }
}
