"""Jobs: the app layer's work that writes files and talks to people.

Each job drives library calls and owns its outputs: `caption` (files, folders, URLs → JSONL/CSV
rows or sidecar .txt files), `evaluate` (a model on a split → metrics.json, samples, report.html),
`demo` (scenes → train → evaluate → caption → report). Jobs may print progress; the library may
not. The CLI and the server sit on top of the library and of these jobs.
"""
