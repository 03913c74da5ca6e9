"""The toy world (shapes, captions, facts, reasoning prompts), its independent judge, and
`metamorph demo`: the whole method, offline, on a CPU, measured. See :mod:`.world` and
:mod:`.demo`."""
