//! serde for KVM structures that refuses a blob of the wrong size.
//!
//! kvm-bindings serialises its structures as their raw bytes, and on the way back it
//! zero-pads a short blob and truncates a long one (so states survive a kernel adding
//! fields). A snapshot or a migration stream is untrusted: a register blob of the wrong
//! length is a corrupt state, and loading it padded would crash the guest. These
//! helpers keep the encoding (`#[serde(with = ...)]`) and check the length first.

use serde::de::{value::BytesDeserializer, DeserializeOwned, Error};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

fn from_exact<T: DeserializeOwned, E: Error>(bytes: &[u8]) -> Result<T, E> {
    let want = std::mem::size_of::<T>();
    if bytes.len() != want {
        let name = std::any::type_name::<T>()
            .rsplit("::")
            .next()
            .unwrap_or("?");
        return Err(E::custom(format!(
            "{name} is {} bytes, KVM's is {want}",
            bytes.len()
        )));
    }
    T::deserialize(BytesDeserializer::<E>::new(bytes))
}

/// One structure.
pub mod exact {
    use super::*;

    /// As kvm-bindings writes it.
    pub fn serialize<T: Serialize, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }

    /// Only a blob of exactly `size_of::<T>()` bytes.
    pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(
        d: D,
    ) -> Result<T, D::Error> {
        from_exact(&Vec::<u8>::deserialize(d)?)
    }
}

/// An optional structure.
pub mod exact_opt {
    use super::*;

    /// As kvm-bindings writes it.
    pub fn serialize<T: Serialize, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }

    /// None, or a blob of exactly `size_of::<T>()` bytes.
    pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<T>, D::Error> {
        Option::<Vec<u8>>::deserialize(d)?
            .map(|b| from_exact(&b))
            .transpose()
    }
}

/// A list of structures.
pub mod exact_vec {
    use super::*;

    /// As kvm-bindings writes it.
    pub fn serialize<T: Serialize, S: Serializer>(v: &[T], s: S) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }

    /// Blobs of exactly `size_of::<T>()` bytes each.
    pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<T>, D::Error> {
        Vec::<Vec<u8>>::deserialize(d)?
            .iter()
            .map(|b| from_exact(b))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use kvm_bindings::{kvm_lapic_state, kvm_regs};
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Serialize, Deserialize)]
    struct S {
        #[serde(with = "super::exact")]
        regs: kvm_regs,
        #[serde(with = "super::exact_opt")]
        lapic: Option<kvm_lapic_state>,
        #[serde(with = "super::exact_vec")]
        list: Vec<kvm_regs>,
    }

    #[test]
    fn round_trips_and_refuses_other_sizes() {
        let s = S {
            regs: kvm_regs {
                rip: 0x1234,
                ..Default::default()
            },
            lapic: Some(kvm_lapic_state::default()),
            list: vec![kvm_regs::default(); 2],
        };
        let json = serde_json::to_value(&s).unwrap();
        let back: S = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back.regs.rip, 0x1234);
        assert_eq!(back.list.len(), 2);
        // The encoding is kvm-bindings' own (an array of bytes).
        assert_eq!(json["regs"], serde_json::to_value(s.regs).unwrap());
        for field in ["regs", "lapic"] {
            for delta in [-1i64, 1] {
                let mut j = json.clone();
                let arr = j[field].as_array_mut().unwrap();
                if delta < 0 {
                    arr.pop();
                } else {
                    arr.push(0.into());
                }
                let e = serde_json::from_value::<S>(j).unwrap_err().to_string();
                assert!(e.contains("bytes, KVM's is"), "{field} {delta}: {e}");
            }
        }
        let mut j = json.clone();
        j["list"][1].as_array_mut().unwrap().pop();
        assert!(serde_json::from_value::<S>(j).is_err());
        let mut j = json;
        j["lapic"] = serde_json::Value::Null;
        assert!(serde_json::from_value::<S>(j).unwrap().lapic.is_none());
    }
}
