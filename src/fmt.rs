//! Numbers written so that reading them back gives the same value.

use crate::dtype::{DType, Float};

/// `value` as text that parses back to exactly the same `E`: the shortest round-trip form for
/// f32 and f64, and the exact decimal value for f16 and bf16 (at most a few dozen digits), so a
/// 16-bit loss is written as the number it is.
///
/// ```
/// use nbit::fmt::exact;
/// use half::f16;
/// assert_eq!(exact(f16::from_f32(0.1)), "0.0999755859375");
/// assert_eq!(exact(0.1f32), "0.1");
/// assert_eq!(exact(1.0f64 / 3.0), "0.3333333333333333");
/// ```
pub fn exact<E: Float>(value: E) -> String {
    match E::DTYPE {
        DType::F16 | DType::BF16 => exact_decimal(value.as_f64()),
        DType::F32 => format!("{}", value.as_f32()),
        _ => format!("{}", value.as_f64()),
    }
}

/// The exact decimal expansion of a finite f64 (every binary fraction has one).
pub fn exact_decimal(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    let bits = v.to_bits();
    let negative = bits >> 63 == 1;
    let exp_bits = ((bits >> 52) & 0x7ff) as i64;
    let frac = bits & ((1u64 << 52) - 1);
    let (mut mantissa, mut exp) = if exp_bits == 0 {
        (frac, -1074)
    } else {
        (frac | (1u64 << 52), exp_bits - 1075)
    };
    if mantissa == 0 {
        return if negative { "-0".into() } else { "0".into() };
    }
    while mantissa % 2 == 0 {
        mantissa /= 2;
        exp += 1;
    }
    // Decimal digits, least significant first.
    let mut digits: Vec<u8> = mantissa.to_string().bytes().rev().map(|b| b - b'0').collect();
    let mul = |digits: &mut Vec<u8>, k: u8| {
        let mut carry = 0u32;
        for d in digits.iter_mut() {
            let x = *d as u32 * k as u32 + carry;
            *d = (x % 10) as u8;
            carry = x / 10;
        }
        while carry > 0 {
            digits.push((carry % 10) as u8);
            carry /= 10;
        }
    };
    let point = if exp >= 0 {
        (0..exp).for_each(|_| mul(&mut digits, 2));
        0
    } else {
        // m * 2^-k = m * 5^k / 10^k
        (0..-exp).for_each(|_| mul(&mut digits, 5));
        (-exp) as usize
    };
    while digits.len() <= point {
        digits.push(0);
    }
    let text: String = digits.iter().rev().map(|d| (b'0' + d) as char).collect();
    let (int, fracpart) = text.split_at(text.len() - point);
    let sign = if negative { "-" } else { "" };
    if point == 0 {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{fracpart}")
    }
}

/// A byte count for people: `"51.2 GB (51200000512 bytes)"`, in decimal units as Lightning's
/// model summary uses.
///
/// ```
/// assert_eq!(nbit::fmt::bytes(51_200_000_512), "51.2 GB (51200000512 bytes)");
/// assert_eq!(nbit::fmt::bytes(900), "900 bytes");
/// ```
pub fn bytes(n: u64) -> String {
    let units = [(1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")];
    match units.iter().find(|(size, _)| n as f64 >= *size) {
        Some((size, unit)) => format!("{:.1} {unit} ({n} bytes)", n as f64 / size),
        None => format!("{n} bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    #[test]
    fn sixteen_bit_values_are_written_exactly_and_read_back() {
        for x in [0.1f32, 1.094_726_6, 65504.0, 5.960_464_5e-8, -2.5, 1e-3, 3.0e38] {
            for v in [f16::from_f32(x).to_f64(), bf16::from_f32(x).to_f64()] {
                let s = exact_decimal(v);
                assert_eq!(s.parse::<f64>().unwrap(), v, "{s}");
            }
        }
        assert_eq!(exact(f16::from_f32(5.9604645e-8)), "0.000000059604644775390625");
        assert_eq!(exact(bf16::from_f32(3.0)), "3");
        assert_eq!(exact_decimal(0.0), "0");
    }

    #[test]
    fn wide_values_round_trip_shortest() {
        let v = 0.1f64 + 0.2;
        assert_eq!(exact(v).parse::<f64>().unwrap(), v);
        assert_eq!(exact(0.3f32 + 0.6), "0.90000004");
    }
}
