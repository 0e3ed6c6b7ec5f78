//! The compatibility check both sides run on the other's Hello / Welcome. One function, so the
//! two sides cannot drift apart.

use crate::error::HandshakeError;
use crate::frame::PROTOCOL_VERSION;
use crate::layout::{check_page_size, Layout};

/// What one side offers: its version, page size and layout (an empty layout on the client means
/// "accept the server's").
#[derive(Debug, Clone, Copy)]
pub struct Offer<'a> {
    /// Protocol version.
    pub version: u16,
    /// Page size in bytes.
    pub page_size: u32,
    /// Memory layout.
    pub layout: &'a Layout,
}

/// Checks `theirs` against `ours`. Either layout may be empty (no expectation); if both are
/// given they must be equal. Returns the first disagreement, naming both values.
pub fn check(ours: Offer<'_>, theirs: Offer<'_>) -> Result<(), HandshakeError> {
    if ours.version != theirs.version {
        return Err(HandshakeError::Version {
            ours: ours.version,
            theirs: theirs.version,
        });
    }
    check_page_size(theirs.page_size)?;
    if ours.page_size != theirs.page_size {
        return Err(HandshakeError::PageSize {
            ours: ours.page_size,
            theirs: theirs.page_size,
        });
    }
    for l in [ours.layout, theirs.layout] {
        if !l.regions.is_empty() {
            l.validate(ours.page_size)?;
        }
    }
    if !ours.layout.regions.is_empty()
        && !theirs.layout.regions.is_empty()
        && ours.layout != theirs.layout
    {
        return Err(HandshakeError::Layout {
            ours: ours.layout.to_string(),
            theirs: theirs.layout.to_string(),
        });
    }
    Ok(())
}

/// Our offer with the crate's protocol version.
pub fn offer(page_size: u32, layout: &Layout) -> Offer<'_> {
    Offer {
        version: PROTOCOL_VERSION,
        page_size,
        layout,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatches_name_both_sides() {
        let a = Layout::single(1 << 20);
        let b = Layout::single(2 << 20);
        let empty = Layout::default();
        assert!(check(offer(4096, &a), offer(4096, &a)).is_ok());
        assert!(check(offer(4096, &a), offer(4096, &empty)).is_ok());
        let e = check(offer(4096, &a), offer(8192, &a)).unwrap_err();
        assert_eq!(
            e,
            HandshakeError::PageSize {
                ours: 4096,
                theirs: 8192
            }
        );
        assert!(e.to_string().contains("4096") && e.to_string().contains("8192"));
        let e = check(offer(4096, &a), offer(4096, &b)).unwrap_err();
        assert!(matches!(e, HandshakeError::Layout { .. }));
        assert!(e.to_string().contains("0x100000") && e.to_string().contains("0x200000"));
        let mut v = offer(4096, &a);
        v.version = 7;
        assert_eq!(
            check(offer(4096, &a), v).unwrap_err(),
            HandshakeError::Version { ours: 1, theirs: 7 }
        );
    }
}
