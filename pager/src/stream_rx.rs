//! Receiving the bulk stream: each `Pages` frame is read straight into a staging buffer laid
//! out page by page (its header and zero mask first, then the page data scattered into place
//! with `readv`), so no frame buffer is needed. Data runs are installed with one `UFFDIO_COPY`
//! each, zero runs with `UFFDIO_ZEROPAGE`, which allocates no memory. (Folding short zero runs
//! into the copies was measured: it saved ioctls but cost more in page allocation — 275 vs
//! 258 ms for 1 GiB — and raises the VM's memory use, so it is not done.) The scattered read
//! is [`transport::Sock::read_exact_vectored`]: `readv(2)` on a plaintext socket, decrypted
//! record by record into the same buffers under TLS.

use std::io::{self, IoSliceMut, Read};

use proto::{
    bit, mask_len, pages_data_len, pages_fixed, Header, Kind, Message, HEADER_LEN, PAGES_FIXED_LEN,
};
use transport::Sock;

use crate::error::PagerError;
use crate::shared::{Origin, Shared};

/// Why receiving stopped.
pub(crate) enum RxError {
    /// The connection failed or the peer sent something invalid: reconnect.
    Lost(String),
    /// Installing failed: fatal.
    Install(PagerError),
}

impl From<io::Error> for RxError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            RxError::Lost("closed by the source".into())
        } else {
            RxError::Lost(e.to_string())
        }
    }
}

pub(crate) struct StreamRx {
    ps: usize,
    slots: Vec<u8>,
    mask: Vec<u8>,
    other: Vec<u8>,
}

impl StreamRx {
    pub(crate) fn new(page_size: usize) -> Self {
        StreamRx {
            ps: page_size,
            slots: Vec::new(),
            mask: Vec::new(),
            other: Vec::new(),
        }
    }

    /// Receives and installs one frame.
    pub(crate) fn receive(&mut self, sock: &mut Sock, sh: &Shared) -> Result<(), RxError> {
        let ps = self.ps;
        let mut head = [0u8; HEADER_LEN + PAGES_FIXED_LEN];
        sock.read_exact(&mut head[..HEADER_LEN])?;
        let header = Header::decode(&head).map_err(|e| RxError::Lost(format!("bad frame: {e}")))?;
        if header.kind != Kind::Pages || (header.payload_len as usize) < PAGES_FIXED_LEN {
            return Err(self.not_pages(sock, &header));
        }
        sock.read_exact(&mut head[HEADER_LEN..])?;
        let bad = |e: proto::DecodeError| RxError::Lost(format!("bad Pages frame: {e}"));
        let (first, count, origin) = pages_fixed(&head[HEADER_LEN..]).map_err(bad)?;
        if first.0 + u64::from(count) > sh.total_pages() {
            // a broken source: fatal, before a byte of the frame is read or installed (its
            // pages inside the layout are no more to be trusted than the others)
            return Err(RxError::Install(PagerError::Protocol {
                addr: sock.peer_name(),
                what: format!(
                    "bulk connection: a Pages frame for pages {}+{count}, beyond the {} pages of the layout",
                    first.0,
                    sh.total_pages()
                ),
            }));
        }
        self.mask.resize(mask_len(count), 0);
        sock.read_exact(&mut self.mask)?;
        pages_data_len(&header, count, &self.mask, ps as u32).map_err(bad)?;
        let n = count as usize;
        if self.slots.len() < n * ps {
            self.slots.resize(n * ps, 0);
        }
        // scatter the data pages into their slots
        let mut iov = Vec::new();
        // the slots from page `done` on, not yet handed to an IoSliceMut
        let mut rest: &mut [u8] = &mut self.slots[..n * ps];
        let mut done = 0;
        let mut i = 0;
        while i < n {
            if bit(&self.mask, i) {
                i += 1;
                continue;
            }
            let s = i;
            while i < n && !bit(&self.mask, i) {
                i += 1;
            }
            let (_, tail) = std::mem::take(&mut rest).split_at_mut((s - done) * ps);
            let (run, tail) = tail.split_at_mut((i - s) * ps);
            iov.push(IoSliceMut::new(run));
            rest = tail;
            done = i;
        }
        sock.read_exact_vectored(&mut iov)?;
        let precopy = origin == proto::Origin::Precopy;
        self.install(first.0, n, sh, precopy)
            .map_err(RxError::Install)?;
        if precopy {
            sh.stats
                .precopy_received
                .fetch_add(n as u64, std::sync::atomic::Ordering::AcqRel);
        }
        Ok(())
    }

    /// Installs the staged frame: each maximal run of data pages with one copy, each run of
    /// zero pages as zero pages.
    fn install(
        &mut self,
        first: u64,
        n: usize,
        sh: &Shared,
        precopy: bool,
    ) -> Result<(), PagerError> {
        let ps = self.ps;
        let mut i = 0;
        while i < n {
            let zero = bit(&self.mask, i);
            let s = i;
            while i < n && bit(&self.mask, i) == zero {
                i += 1;
            }
            let data = (!zero).then(|| &self.slots[s * ps..i * ps]);
            if precopy || sh.precopy.load(std::sync::atomic::Ordering::Acquire) {
                sh.install_precopy(first + s as u64, (i - s) as u64, data, !precopy)?;
            } else {
                sh.install(first + s as u64, (i - s) as u64, data, Origin::Stream)?;
            }
        }
        Ok(())
    }

    /// A frame that is not `Pages`: read it whole and say why the stream cannot go on.
    fn not_pages(&mut self, sock: &mut Sock, header: &Header) -> RxError {
        self.other.resize(header.payload_len as usize, 0);
        if let Err(e) = sock.read_exact(&mut self.other) {
            return e.into();
        }
        match Message::decode(header, &self.other, self.ps as u32) {
            Ok(Message::Error { code, reason }) => {
                RxError::Lost(format!("source reported error {code}: {reason}"))
            }
            Ok(m) => RxError::Lost(format!("unexpected {:?} on a bulk connection", m.kind())),
            Err(e) => RxError::Lost(format!("bad frame: {e}")),
        }
    }
}
