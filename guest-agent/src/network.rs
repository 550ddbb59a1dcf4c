//! guest-network-get-interfaces: each interface with its hardware address, IPv4 and IPv6
//! addresses (from getifaddrs(3)) and its counters (from sysfs), as qga reports them.

use crate::protocol::CommandError;
use serde_json::{json, Value};
use std::ffi::CStr;
use std::net::{Ipv4Addr, Ipv6Addr};

/// The interfaces, in the order getifaddrs gives them.
pub fn interfaces() -> Result<Value, CommandError> {
    let mut list: Vec<(String, Vec<Value>)> = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list and stores its head in `head`.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(CommandError::generic(format!(
            "getifaddrs failed: {}",
            std::io::Error::last_os_error()
        )));
    }
    let mut at = head;
    while !at.is_null() {
        // SAFETY: `at` is a node of the list getifaddrs returned, not yet freed.
        let entry = unsafe { &*at };
        at = entry.ifa_next;
        if entry.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(entry.ifa_name) }
            .to_string_lossy()
            .into_owned();
        let index = match list.iter().position(|(n, _)| *n == name) {
            Some(i) => i,
            None => {
                list.push((name, Vec::new()));
                list.len() - 1
            }
        };
        if let Some(address) = address(entry) {
            list[index].1.push(address);
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once, after the last use.
    unsafe { libc::freeifaddrs(head) };
    Ok(Value::Array(
        list.into_iter()
            .map(|(name, addresses)| {
                let sys = std::path::Path::new("/sys/class/net").join(&name);
                let mut entry = json!({"name": name});
                if let Ok(mac) = std::fs::read_to_string(sys.join("address")) {
                    entry["hardware-address"] = json!(mac.trim());
                }
                if !addresses.is_empty() {
                    entry["ip-addresses"] = Value::Array(addresses);
                }
                let stat = |counter: &str| -> Option<u64> {
                    std::fs::read_to_string(sys.join("statistics").join(counter))
                        .ok()?
                        .trim()
                        .parse()
                        .ok()
                };
                let counters = [
                    ("rx-bytes", "rx_bytes"),
                    ("rx-packets", "rx_packets"),
                    ("rx-errs", "rx_errors"),
                    ("rx-dropped", "rx_dropped"),
                    ("tx-bytes", "tx_bytes"),
                    ("tx-packets", "tx_packets"),
                    ("tx-errs", "tx_errors"),
                    ("tx-dropped", "tx_dropped"),
                ];
                let values: Option<Vec<(&str, u64)>> = counters
                    .iter()
                    .map(|(key, file)| Some((*key, stat(file)?)))
                    .collect();
                if let Some(values) = values {
                    entry["statistics"] = Value::Object(
                        values
                            .into_iter()
                            .map(|(k, v)| (k.into(), json!(v)))
                            .collect(),
                    );
                }
                entry
            })
            .collect(),
    ))
}

/// The `GuestIpAddress` of an IPv4 or IPv6 entry.
fn address(entry: &libc::ifaddrs) -> Option<Value> {
    if entry.ifa_addr.is_null() {
        return None;
    }
    // SAFETY: ifa_addr points at a sockaddr whose family says its real type; the casts
    // below follow the family.
    let family = i32::from(unsafe { (*entry.ifa_addr).sa_family });
    let prefix_of = |bytes: &[u8]| bytes.iter().map(|b| b.count_ones()).sum::<u32>();
    match family {
        libc::AF_INET => {
            // SAFETY: an AF_INET address is a sockaddr_in.
            let sin = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            let prefix = if entry.ifa_netmask.is_null() {
                32
            } else {
                // SAFETY: the netmask of an AF_INET entry is a sockaddr_in too.
                let mask = unsafe { &*(entry.ifa_netmask as *const libc::sockaddr_in) };
                prefix_of(&mask.sin_addr.s_addr.to_ne_bytes())
            };
            Some(json!({"ip-address": ip.to_string(), "ip-address-type": "ipv4", "prefix": prefix}))
        }
        libc::AF_INET6 => {
            // SAFETY: an AF_INET6 address is a sockaddr_in6.
            let sin6 = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in6) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            let prefix = if entry.ifa_netmask.is_null() {
                128
            } else {
                // SAFETY: the netmask of an AF_INET6 entry is a sockaddr_in6 too.
                let mask = unsafe { &*(entry.ifa_netmask as *const libc::sockaddr_in6) };
                prefix_of(&mask.sin6_addr.s6_addr)
            };
            Some(json!({"ip-address": ip.to_string(), "ip-address-type": "ipv6", "prefix": prefix}))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_is_listed_with_its_address() {
        let list = super::interfaces().unwrap();
        let lo = list
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == "lo")
            .cloned()
            .expect("lo");
        if let Some(addresses) = lo["ip-addresses"].as_array() {
            assert!(addresses
                .iter()
                .any(|a| a["ip-address"] == "127.0.0.1" && a["prefix"] == 8));
        }
    }
}
