//! CPUID normalisation: KVM_GET_SUPPORTED_CPUID describes the host; each vCPU needs its
//! own APIC ID, a topology that matches the vCPU count (1 socket, N cores, 1 thread per
//! core), the hypervisor bit, and no features a VMM cannot migrate (the PMU).

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;
/// KVM PV features (leaf 0x4000_0001 EAX) whose use means a hypercall (VMCALL).
const KVM_FEATURE_PV_UNHALT: u32 = 1 << 7;
const KVM_FEATURE_PV_SEND_IPI: u32 = 1 << 11;
const KVM_FEATURE_PV_SCHED_YIELD: u32 = 1 << 13;
/// All of them.
pub const KVM_HYPERCALL_FEATURES: u32 =
    KVM_FEATURE_PV_UNHALT | KVM_FEATURE_PV_SEND_IPI | KVM_FEATURE_PV_SCHED_YIELD;
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d]; // "KVMKVMKVM\0\0\0"

/// CPU vendor, from leaf 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    /// GenuineIntel (and anything not AMD).
    Intel,
    /// AuthenticAMD or HygonGenuine.
    Amd,
}

/// Reads the vendor from leaf 0 of a CPUID table.
pub fn vendor(entries: &[kvm_cpuid_entry2]) -> Vendor {
    let leaf0 = entries.iter().find(|e| e.function == 0);
    match leaf0 {
        // "AuthenticAMD": ebx "Auth", edx "enti", ecx "cAMD"; Hygon: "HygonGenuine".
        Some(e) if e.ebx == 0x6874_7541 || e.ebx == 0x6f67_7948 => Vendor::Amd,
        _ => Vendor::Intel,
    }
}

/// Bits needed to number `n` items (ceil(log2(n))).
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// What one vCPU's CPUID should say about itself.
#[derive(Clone, Copy, Debug)]
pub struct VcpuTopology {
    /// This vCPU's index, which is also its APIC ID.
    pub index: u8,
    /// How many vCPUs the VM has.
    pub count: u8,
    /// Whether the in-kernel LAPIC supports TSC-deadline mode (KVM_CAP_TSC_DEADLINE_TIMER).
    pub tsc_deadline: bool,
    /// Hide the KVM PV features that make the guest issue hypercalls (PV IPIs, PV sched
    /// yield, PV spinlock kicks). Set where guest kernel mode is emulated: such hosts
    /// re-execute VMCALL forever instead of completing it.
    pub no_hypercalls: bool,
}

/// Rewrites `entries` (a copy of KVM's supported CPUID) for one vCPU.
pub fn normalize(entries: &mut [kvm_cpuid_entry2], topo: VcpuTopology) {
    let vendor = vendor(entries);
    let id = u32::from(topo.index);
    let count = u32::from(topo.count.max(1));
    let core_bits = id_bits(count);
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                // EBX[31:24] initial APIC ID, [23:16] logical processors per package.
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | ((count & 0xff) << 16);
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
                e.ecx |= ECX_HYPERVISOR;
                if topo.tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                }
            }
            LEAF_CACHE_PARAMS if vendor == Vendor::Intel => {
                // EAX[31:26] cores per package - 1; [25:14] threads sharing this cache - 1.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((sharing & 0xfff) << 14) | ((count - 1) << 26);
            }
            LEAF_PMU => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                let (shift, logical, kind) = match e.index {
                    0 => (0, 1, TOPOLOGY_LEVEL_SMT),
                    1 => (core_bits, count, TOPOLOGY_LEVEL_CORE),
                    _ => (0, 0, 0),
                };
                e.eax = shift;
                e.ebx = logical;
                e.ecx = (kind << 8) | (e.index & 0xff);
                e.edx = id;
            }
            LEAF_KVM_FEATURES if topo.no_hypercalls => {
                e.eax &= !KVM_HYPERCALL_FEATURES;
            }
            LEAF_HYPERVISOR => {
                e.eax = e.eax.max(LEAF_KVM_FEATURES);
                e.ebx = KVM_SIGNATURE[0];
                e.ecx = KVM_SIGNATURE[1];
                e.edx = KVM_SIGNATURE[2];
            }
            LEAF_AMD_SIZES if vendor == Vendor::Amd => {
                // ECX[15:12] APIC ID size, [7:0] cores per package - 1.
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (count - 1);
            }
            LEAF_AMD_TOPOLOGY if vendor == Vendor::Amd => {
                e.eax = id;
                e.ebx = id & 0xff; // one thread per core, core id = index
                e.ecx = 0; // node 0
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0x0808_0800,
            eax: 0xffff_ffff,
            ..Default::default()
        }
    }

    fn table() -> Vec<kvm_cpuid_entry2> {
        let mut l0 = entry(0, 0);
        l0.ebx = 0x756e_6547; // "Genu"
        let mut cache_l1 = entry(4, 0);
        cache_l1.eax = 1 << 5 | 1; // level 1, data cache
        let mut cache_l3 = entry(4, 3);
        cache_l3.eax = 3 << 5 | 3;
        vec![
            l0,
            entry(1, 0),
            cache_l1,
            cache_l3,
            entry(0xa, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(0x4000_0000, 0),
        ]
    }

    fn get(t: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *t.iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    #[test]
    fn apic_id_and_counts_per_vcpu() {
        for (index, count) in [(0u8, 1u8), (1, 2), (5, 8), (2, 3)] {
            let mut t = table();
            normalize(
                &mut t,
                VcpuTopology {
                    index,
                    count,
                    tsc_deadline: true,
                    no_hypercalls: false,
                },
            );
            let l1 = get(&t, 1, 0);
            assert_eq!(l1.ebx >> 24, u32::from(index));
            assert_eq!((l1.ebx >> 16) & 0xff, u32::from(count));
            assert_eq!(l1.ebx & 0xffff, 0x0800, "clflush size kept");
            assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
            assert_ne!(l1.ecx & ECX_TSC_DEADLINE, 0);
            assert_eq!(l1.edx & EDX_HTT != 0, count > 1);
            let smt = get(&t, 0xb, 0);
            let core = get(&t, 0xb, 1);
            let end = get(&t, 0xb, 2);
            assert_eq!((smt.ebx, smt.ecx >> 8, smt.edx), (1, 1, u32::from(index)));
            assert_eq!((core.ebx, core.ecx >> 8), (u32::from(count), 2));
            assert!(1u32 << core.eax >= u32::from(count), "shift covers all ids");
            assert_eq!((end.ebx, end.ecx >> 8), (0, 0));
            let c = get(&t, 4, 0);
            assert_eq!(c.eax >> 26, u32::from(count) - 1);
            assert_eq!((c.eax >> 14) & 0xfff, 0, "L1 is per core");
            let l3 = get(&t, 4, 3);
            assert_eq!((l3.eax >> 14) & 0xfff, u32::from(count) - 1, "L3 shared");
            let pmu = get(&t, 0xa, 0);
            assert_eq!((pmu.eax, pmu.ebx, pmu.ecx, pmu.edx), (0, 0, 0, 0));
            let hv = get(&t, 0x4000_0000, 0);
            assert_eq!([hv.ebx, hv.ecx, hv.edx], KVM_SIGNATURE);
        }
    }

    #[test]
    fn hypercall_features_hidden_only_on_request() {
        let mut kvm = entry(0x4000_0001, 0);
        kvm.eax = 0x01ff_ffff;
        for hide in [false, true] {
            let mut t = table();
            t.push(kvm);
            normalize(
                &mut t,
                VcpuTopology {
                    index: 0,
                    count: 2,
                    tsc_deadline: false,
                    no_hypercalls: hide,
                },
            );
            let eax = get(&t, 0x4000_0001, 0).eax;
            assert_eq!(eax & KVM_HYPERCALL_FEATURES == 0, hide);
            // kvmclock and the rest stay.
            assert_eq!(eax | KVM_HYPERCALL_FEATURES, 0x01ff_ffff);
        }
    }

    #[test]
    fn id_bits_is_ceil_log2() {
        assert_eq!(
            [1, 2, 3, 4, 5, 8, 9, 254].map(id_bits),
            [0, 1, 2, 2, 3, 3, 4, 8]
        );
    }

    #[test]
    fn amd_topology_leaves() {
        let mut t = table();
        t[0].ebx = 0x6874_7541; // "Auth"
        t.push(entry(0x8000_0008, 0));
        t.push(entry(0x8000_001e, 0));
        normalize(
            &mut t,
            VcpuTopology {
                index: 3,
                count: 4,
                tsc_deadline: false,
                no_hypercalls: false,
            },
        );
        assert_eq!(get(&t, 0x8000_0008, 0).ecx & 0xff, 3);
        assert_eq!(get(&t, 0x8000_001e, 0).eax, 3);
        assert_eq!(get(&t, 1, 0).ecx & ECX_TSC_DEADLINE, 0);
    }
}
