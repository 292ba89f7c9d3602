"""PMI-1, PMI-2 and PMIx servers and clients (sans-I/O codecs, thin transports)."""
