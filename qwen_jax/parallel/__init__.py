"""Where sharding is decided: the ('data', 'fsdp', 'tensor') mesh and the logical-axis rules.
The lowest layer of the package: it receives logical axes and imports no other part."""
