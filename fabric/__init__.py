"""libfabric discovery, provider selection and host-provider bind plans."""
