"""PMI-1 and PMI-2 for MPI ranks: sans-I/O codecs, one job/KVS core, thin transports.

messages  the requests and replies both protocols carry (frozen dataclasses)
codec     wire framing: ServerCodec / ClientCodec, PmiProtocolError
job       Job: size, rank → node mapping, KVS, fences, attributes (no I/O, no clock)
server    PmiServer: asyncio PMI_FD / PMI_PORT transports for the launcher's loop
client    Pmi1Client / Pmi2Client: blocking clients for one rank
probe     probe(version): one rank's view of its PMI server (`rankwire pmi probe`)
"""
