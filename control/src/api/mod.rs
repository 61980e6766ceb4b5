//! What the API serves: resources, objects' metadata, validation and defaulting, selectors,
//! patches, table printing and OpenAPI. Pure code: nothing here does I/O.

pub mod allocator;
pub mod meta;
pub mod openapi;
mod openapi_proto;
pub mod patch;
pub mod query;
pub mod resources;
pub mod selector;
pub mod status;
pub mod table;
pub mod validation;
pub mod yaml_guard;

pub use resources::{Kind, ResourceInfo, RESOURCES};
pub use status::{ApiError, Details, FieldError};
