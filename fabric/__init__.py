"""libfabric discovery, provider selection and host-provider bind plans.

Entry points for the runtime: `facts.fabric_facts(image_facts, choice)` gathers what the
pure `plan.plan_fabric(host, image, choice)` needs; it returns a `FabricPlan` (provider,
reason, env, mounts) for `--fabric auto|none|<provider>`.

- `discovery`: cffi ABI-mode binding of libfabric (fi_getinfo & co.) as frozen dataclasses
- `hostfacts`: adapters from sysfs/devfs, the host libfabric and its ELF dependency graph
- `imagefacts`: an image's glibc, libfabric copies and consumers, read with unsquashfs
- `facts`: gathers host and image facts as a choice needs them
- `plan`: the pure planner `plan_fabric` and its symbol-version checks
- `pingpong`: the C self-test (pingpong.c), built on demand, run on the host or in a container
- `cli`: `rankwire fabric info|plan|pingpong`
"""
