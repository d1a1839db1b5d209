//! Generated protobuf and gRPC code. Nothing here is written by hand.
//!
//! The module tree mirrors the proto packages because the generated code
//! refers to other packages by relative `super::` paths.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// Envoy's packages (our own wire-compatible subset).
pub mod envoy {
    /// `envoy.service.*`
    pub mod service {
        /// `envoy.service.ratelimit.*`
        pub mod ratelimit {
            /// `envoy.service.ratelimit.v3`: the RLS request, response and service.
            pub mod v3 {
                tonic::include_proto!("envoy.service.ratelimit.v3");
            }
        }
    }
    /// `envoy.extensions.*`
    pub mod extensions {
        /// `envoy.extensions.common.*`
        pub mod common {
            /// `envoy.extensions.common.ratelimit.*`
            pub mod ratelimit {
                /// `envoy.extensions.common.ratelimit.v3`: `RateLimitDescriptor`.
                pub mod v3 {
                    tonic::include_proto!("envoy.extensions.common.ratelimit.v3");
                }
            }
        }
    }
    /// `envoy.config.*`
    pub mod config {
        /// `envoy.config.core.*`
        pub mod core {
            /// `envoy.config.core.v3`: `HeaderValue`.
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    /// `envoy.type.*`
    pub mod r#type {
        /// `envoy.type.v3`: `RateLimitUnit`.
        pub mod v3 {
            tonic::include_proto!("envoy.r#type.v3");
        }
    }
}

/// sluice's own packages.
pub mod sluice {
    /// `sluice.usage.*`
    pub mod usage {
        /// `sluice.usage.v1`: ReportUsage, Reserve, Settle.
        pub mod v1 {
            tonic::include_proto!("sluice.usage.v1");
        }
    }
    /// `sluice.admin.*`
    pub mod admin {
        /// `sluice.admin.v1`: usage plans, API keys and usage.
        pub mod v1 {
            tonic::include_proto!("sluice.admin.v1");
        }
    }
}

pub use envoy::config::core::v3 as core;
pub use envoy::extensions::common::ratelimit::v3 as common;
pub use envoy::r#type::v3 as types;
pub use envoy::service::ratelimit::v3 as rls;
pub use sluice::admin::v1 as admin;
pub use sluice::usage::v1 as usage;

/// The encoded FileDescriptorSet of every proto sluice serves, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sluice_descriptor.bin"));
