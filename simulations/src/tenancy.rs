//! Virtual clients as slices of stacked adapters over one shared backbone. Not built yet.
