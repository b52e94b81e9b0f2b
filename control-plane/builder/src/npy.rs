//! A small reader for NumPy `.npy` files (version 1/2/3, little-endian numeric dtypes, C order).

pub const MAGIC: &[u8] = b"\x93NUMPY";

#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

pub fn parse(bytes: &[u8]) -> Result<NpyArray, String> {
    if !bytes.starts_with(MAGIC) || bytes.len() < 10 {
        return Err("not a .npy file".into());
    }
    let major = bytes[6];
    let (hlen, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        _ => return Err(format!(".npy version {major} is not supported")),
    };
    let header = bytes
        .get(start..start + hlen)
        .ok_or("truncated .npy header")
        .and_then(|h| std::str::from_utf8(h).map_err(|_| "non-UTF-8 .npy header"))?;
    let field = |key: &str| -> Result<&str, String> {
        let at = header.find(&format!("'{key}'")).ok_or(format!(".npy header lacks {key}"))?;
        let rest = &header[at + key.len() + 2..];
        Ok(rest.trim_start().trim_start_matches(':').trim_start())
    };
    let descr = field("descr")?;
    let descr = descr.trim_start_matches('\'').split('\'').next().unwrap_or("");
    if field("fortran_order")?.starts_with("True") {
        return Err("Fortran-ordered .npy arrays are not supported; save with C order".into());
    }
    let shape_s = field("shape")?;
    let shape_s = &shape_s[1..shape_s.find(')').ok_or("bad shape in .npy header")?];
    let shape: Vec<usize> = shape_s
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>().map_err(|_| format!("bad dimension {s:?}")))
        .collect::<Result<_, _>>()?;
    let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("shape overflows")?;
    let body = &bytes[start + hlen..];
    let take = |size: usize| -> Result<std::slice::ChunksExact<'_, u8>, String> {
        let need = count.checked_mul(size).ok_or("shape overflows")?;
        if body.len() < need {
            return Err(format!(".npy data holds {} bytes, shape needs {need}", body.len()));
        }
        Ok(body[..need].chunks_exact(size))
    };
    let data: Vec<f64> = match descr {
        "<f4" => take(4)?.map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")) as f64).collect(),
        "<f8" => take(8)?.map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect(),
        "<i8" => take(8)?.map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f64).collect(),
        "<i4" => take(4)?.map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as f64).collect(),
        "|u1" => take(1)?.map(|c| c[0] as f64).collect(),
        "|i1" => take(1)?.map(|c| c[0] as i8 as f64).collect(),
        other => {
            return Err(format!(
                ".npy dtype {other:?} is not supported (use float32, float64, int64, int32, uint8, int8)"
            ));
        }
    };
    Ok(NpyArray { shape, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_committed_baseline() {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/models/digits_baseline.npy");
        let a = parse(&std::fs::read(p).unwrap()).unwrap();
        assert_eq!(a.shape, vec![450, 1, 8, 8]);
        assert_eq!(a.data.len(), 450 * 64);
        assert!(a.data.iter().all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn refuses_short_data() {
        let mut f = MAGIC.to_vec();
        f.extend([1, 0]);
        let h = b"{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }";
        f.extend((h.len() as u16).to_le_bytes());
        f.extend(h);
        f.extend([0u8; 8]);
        assert!(parse(&f).unwrap_err().contains("shape needs 12"));
    }
}
