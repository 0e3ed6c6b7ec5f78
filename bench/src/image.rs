//! The benchmark's memory image: random bytes with about 30 % zero pages, made once and cached.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

/// A fast deterministic generator (splitmix64).
pub struct Rng(pub u64);

impl Rng {
    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Writes `size_mib` MiB of random pages, ~30 % of them zero, unless a file of that size exists.
pub fn make(path: &Path, size_mib: u64) -> anyhow::Result<()> {
    let bytes = size_mib << 20;
    if std::fs::metadata(path)
        .map(|m| m.len() == bytes)
        .unwrap_or(false)
    {
        return Ok(());
    }
    let tmp = path.with_extension("partial");
    let f = std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    let mut w = std::io::BufWriter::with_capacity(4 << 20, f);
    let mut rng = Rng(0x1234_5678);
    let mut page = vec![0u8; 4096];
    for _ in 0..bytes / 4096 {
        if rng.next_u64() % 10 < 3 {
            page.fill(0);
        } else {
            for c in page.chunks_exact_mut(8) {
                c.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
        }
        w.write_all(&page)?;
    }
    w.flush()?;
    drop(w);
    std::fs::rename(&tmp, path)?;
    Ok(())
}
