//! x86_64 specifics: the guest physical memory layout, kernel loading and boot protocols
//! (`boot`), vCPU register, CPUID and MSR setup (`regs`, `cpuid`, `msr`), the MP table that
//! tells a guest without ACPI about its vCPUs and interrupt routing (`mptable`), and keeping a
//! snapshot's TSC and kvmclock in step (`tsc`).

pub mod boot;
pub mod cpuid;
pub mod lapic;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
pub mod tsc;
