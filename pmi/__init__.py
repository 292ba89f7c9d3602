"""PMI-1 and PMI-2 for MPI ranks: sans-I/O codecs, one job/KVS core, thin transports.

messages  the requests and replies both protocols carry (frozen dataclasses)
commands  the command table: how each message is spelled in PMI-1 and PMI-2, both ways
fields    the field kinds the table is made of (how one value is written and read)
framing   bytes ↔ (cmd, fields): PMI-1 lines, PMI-2 length-prefixed bodies
codec     ServerCodec / ClientCodec: one connection's state over the table and framing
errors    LocalProtocolError (we misused a codec) / RemoteProtocolError (the peer did)
job       Job: size, rank → node mapping, KVS, fences, attributes (no I/O, no clock)
server    PmiServer: asyncio PMI_FD / PMI_PORT transports for the launcher's loop
client    Pmi1Client / Pmi2Client: blocking clients for one rank
probe     probe(version): one rank's view of its PMI server (`rankwire pmi probe`)
"""
