//! The rail list each side sends in the set-up exchange (bounded, versioned, checked field by
//! field: a peer's list is untrusted input).
//!
//! Layout: version (`1`, or `2` followed by a features byte, see [`Features`]), rail count (at
//! most [`MAX_RAILS`]), then per rail: index, link layer
//! (0 InfiniBand, 1 Ethernet), LID (u16 BE), GID (16 bytes), link rate in Mbit/s (u32 BE),
//! fabric (tag 0 IB + subnet prefix u64, 1 IPv4 + network u32 + prefix length, 2 IPv6 +
//! network u128 + prefix length, 3 unknown), name length (at most 64) and name (ASCII).

use super::matching::RailAd;
use super::Fabric;
use crate::address::LinkLayer;
use std::net::Ipv6Addr;

/// The newest version this build speaks; it also reads version 1 (no features byte).
pub const VERSION: u8 = 2;
/// Version 2's features byte, bit 0: the host serves byte ranges of a piece (one stripe per
/// rail pair) as well as whole pieces.
const FEATURE_RANGES: u8 = 1;

/// What a host does beyond version 1's whole-piece fetches. A list with none is sent as
/// version 1, so a receiver that only speaks version 1 still reads the answer it gets; a
/// receiver that asks in version 2 gets the source's features.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// Serves a byte range of a piece (`Fetch` with a range): one piece striped over rails.
    pub ranges: bool,
}

impl Features {
    /// Everything this build does.
    pub const ALL: Features = Features { ranges: true };

    pub fn is_none(self) -> bool {
        self == Features::default()
    }

    fn bits(self) -> u8 {
        if self.ranges {
            FEATURE_RANGES
        } else {
            0
        }
    }
}
/// More NICs than any host carries; bounds what a peer can make us allocate.
pub const MAX_RAILS: usize = 16;
const MAX_NAME: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RailWireError {
    #[error("truncated after {0} bytes")]
    Truncated(usize),
    #[error("version {0} (this build speaks 1 and {VERSION})")]
    Version(u8),
    /// A features byte with bits this build does not know, or a version 2 list with none
    /// (which is sent as version 1: one encoding per list).
    #[error("features byte {0:#04x}")]
    Features(u8),
    #[error("{0} rails (at most {MAX_RAILS})")]
    TooMany(usize),
    #[error("rail index {0} listed twice")]
    DuplicateIndex(u8),
    #[error("link layer {0}")]
    LinkLayer(u8),
    #[error("fabric tag {0}")]
    FabricTag(u8),
    #[error("prefix length {0}")]
    PrefixLen(u8),
    #[error("rail name is not 1-{MAX_NAME} ASCII characters")]
    Name,
    #[error("{0} bytes after the last rail")]
    Trailing(usize),
}

pub fn encode(rails: &[RailAd], features: Features) -> Result<Vec<u8>, RailWireError> {
    if rails.len() > MAX_RAILS {
        return Err(RailWireError::TooMany(rails.len()));
    }
    let mut out = if features.is_none() {
        vec![1]
    } else {
        vec![2, features.bits()]
    };
    out.push(rails.len() as u8);
    for r in rails {
        if r.name.is_empty() || r.name.len() > MAX_NAME || !r.name.is_ascii() {
            return Err(RailWireError::Name);
        }
        out.push(r.index);
        out.push(match r.link_layer {
            LinkLayer::InfiniBand => 0,
            LinkLayer::Ethernet => 1,
        });
        out.extend_from_slice(&r.lid.to_be_bytes());
        out.extend_from_slice(&r.gid.octets());
        out.extend_from_slice(&r.speed_mbps.to_be_bytes());
        match r.fabric {
            Fabric::InfiniBand { subnet_prefix } => {
                out.push(0);
                out.extend_from_slice(&subnet_prefix.to_be_bytes());
            }
            Fabric::Ipv4 {
                network,
                prefix_len,
            } => {
                out.push(1);
                out.extend_from_slice(&network.to_be_bytes());
                out.push(prefix_len);
            }
            Fabric::Ipv6 {
                network,
                prefix_len,
            } => {
                out.push(2);
                out.extend_from_slice(&network.to_be_bytes());
                out.push(prefix_len);
            }
            Fabric::Unknown => out.push(3),
        }
        out.push(r.name.len() as u8);
        out.extend_from_slice(r.name.as_bytes());
    }
    Ok(out)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], RailWireError> {
        let end = self.at + N;
        let slice = self
            .bytes
            .get(self.at..end)
            .ok_or(RailWireError::Truncated(self.bytes.len()))?;
        self.at = end;
        Ok(slice.try_into().expect("N bytes"))
    }
    fn u8(&mut self) -> Result<u8, RailWireError> {
        Ok(self.take::<1>()?[0])
    }
}

pub fn decode(bytes: &[u8]) -> Result<(Vec<RailAd>, Features), RailWireError> {
    let mut r = Reader { bytes, at: 0 };
    let features = match r.u8()? {
        1 => Features::default(),
        2 => match r.u8()? {
            FEATURE_RANGES => Features { ranges: true },
            other => return Err(RailWireError::Features(other)),
        },
        version => return Err(RailWireError::Version(version)),
    };
    let count = usize::from(r.u8()?);
    if count > MAX_RAILS {
        return Err(RailWireError::TooMany(count));
    }
    let mut rails: Vec<RailAd> = Vec::with_capacity(count);
    for _ in 0..count {
        let index = r.u8()?;
        if rails.iter().any(|a| a.index == index) {
            return Err(RailWireError::DuplicateIndex(index));
        }
        let link_layer = match r.u8()? {
            0 => LinkLayer::InfiniBand,
            1 => LinkLayer::Ethernet,
            other => return Err(RailWireError::LinkLayer(other)),
        };
        let lid = u16::from_be_bytes(r.take()?);
        let gid = Ipv6Addr::from(r.take::<16>()?);
        let speed_mbps = u32::from_be_bytes(r.take()?);
        let fabric = match r.u8()? {
            0 => Fabric::InfiniBand {
                subnet_prefix: u64::from_be_bytes(r.take()?),
            },
            1 => {
                let network = u32::from_be_bytes(r.take()?);
                let prefix_len = r.u8()?;
                if prefix_len > 32 {
                    return Err(RailWireError::PrefixLen(prefix_len));
                }
                Fabric::Ipv4 {
                    network,
                    prefix_len,
                }
            }
            2 => {
                let network = u128::from_be_bytes(r.take()?);
                let prefix_len = r.u8()?;
                if prefix_len > 128 {
                    return Err(RailWireError::PrefixLen(prefix_len));
                }
                Fabric::Ipv6 {
                    network,
                    prefix_len,
                }
            }
            3 => Fabric::Unknown,
            other => return Err(RailWireError::FabricTag(other)),
        };
        let len = usize::from(r.u8()?);
        if len == 0 || len > MAX_NAME {
            return Err(RailWireError::Name);
        }
        let end = r.at + len;
        let name = bytes
            .get(r.at..end)
            .ok_or(RailWireError::Truncated(bytes.len()))?;
        if !name.is_ascii() {
            return Err(RailWireError::Name);
        }
        r.at = end;
        rails.push(RailAd {
            index,
            name: String::from_utf8(name.to_vec()).map_err(|_| RailWireError::Name)?,
            link_layer,
            fabric,
            lid,
            gid,
            speed_mbps,
        });
    }
    if r.at != bytes.len() {
        return Err(RailWireError::Trailing(bytes.len() - r.at));
    }
    Ok((rails, features))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fabric() -> impl Strategy<Value = Fabric> {
        prop_oneof![
            any::<u64>().prop_map(|subnet_prefix| Fabric::InfiniBand { subnet_prefix }),
            (any::<u32>(), 0u8..=32).prop_map(|(network, prefix_len)| Fabric::Ipv4 {
                network,
                prefix_len
            }),
            (any::<u128>(), 0u8..=128).prop_map(|(network, prefix_len)| Fabric::Ipv6 {
                network,
                prefix_len
            }),
            Just(Fabric::Unknown),
        ]
    }

    fn rails() -> impl Strategy<Value = Vec<RailAd>> {
        prop::collection::vec(
            (
                any::<bool>(),
                any::<u16>(),
                any::<[u8; 16]>(),
                any::<u32>(),
                fabric(),
                "[a-z0-9_]{1,64}",
            ),
            0..=MAX_RAILS,
        )
        .prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (ib, lid, gid, speed_mbps, fabric, name))| RailAd {
                    index: i as u8,
                    name,
                    link_layer: if ib {
                        LinkLayer::InfiniBand
                    } else {
                        LinkLayer::Ethernet
                    },
                    fabric,
                    lid,
                    gid: Ipv6Addr::from(gid),
                    speed_mbps,
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn round_trips(list in rails(), ranges in any::<bool>()) {
            let features = Features { ranges };
            let bytes = encode(&list, features).unwrap();
            prop_assert_eq!(bytes[0], if ranges { 2 } else { 1 });
            prop_assert_eq!(decode(&bytes).unwrap(), (list, features));
        }

        #[test]
        fn every_truncation_is_an_error(list in rails(), cut in any::<prop::sample::Index>()) {
            let bytes = encode(&list, Features::ALL).unwrap();
            let cut = cut.index(bytes.len());
            prop_assert!(decode(&bytes[..cut]).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn hostile_lists_get_precise_errors() {
        assert_eq!(decode(&[3, 0]), Err(RailWireError::Version(3)));
        assert_eq!(decode(&[1, 17]), Err(RailWireError::TooMany(17)));
        assert_eq!(decode(&[2, 1, 17]), Err(RailWireError::TooMany(17)));
        // Version 2 without a feature is version 1's list: refused, so each list has one
        // encoding; so are bits this build does not know.
        assert_eq!(decode(&[2, 0, 0]), Err(RailWireError::Features(0)));
        assert_eq!(decode(&[2, 3, 0]), Err(RailWireError::Features(3)));
        assert_eq!(decode(&[2, 1, 0]), Ok((vec![], Features::ALL)));
        assert_eq!(decode(&[1, 0]), Ok((vec![], Features::default())));
        let one = RailAd {
            index: 0,
            name: "rxe0:1".into(),
            link_layer: LinkLayer::Ethernet,
            fabric: Fabric::Unknown,
            lid: 0,
            gid: Ipv6Addr::UNSPECIFIED,
            speed_mbps: 10_000,
        };
        let mut two = encode(&[one.clone(), one.clone()], Features::default()).unwrap();
        assert_eq!(decode(&two), Err(RailWireError::DuplicateIndex(0)));
        two.truncate(2 + (two.len() - 2) / 2);
        two[1] = 1;
        two.push(0);
        assert_eq!(decode(&two), Err(RailWireError::Trailing(1)));
        let mut bad_prefix = encode(
            &[RailAd {
                fabric: Fabric::Ipv4 {
                    network: 0,
                    prefix_len: 24,
                },
                ..one.clone()
            }],
            Features::default(),
        )
        .unwrap();
        let at = 2 + 1 + 1 + 2 + 16 + 4 + 1 + 4;
        bad_prefix[at] = 33;
        assert_eq!(decode(&bad_prefix), Err(RailWireError::PrefixLen(33)));
        assert_eq!(
            encode(
                &[RailAd {
                    name: String::new(),
                    ..one
                }],
                Features::ALL
            ),
            Err(RailWireError::Name)
        );
    }
}
