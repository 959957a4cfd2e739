// Package scenario is imd's benchmark suite as a library: each scenario
// (Conns, C2C, S2C, Group, C2S, Offline) is a struct of options with a
// Run method that drives a server and returns a report, which the table
// writers of this package print and which encodes as the JSON document
// `imbench` writes. cmd/imbench is only its command line.
//
// A scenario gets its server from a Launcher: one that starts imd
// processes (cmd/imbench writes their configuration, which this package
// cannot: it depends on the SDK and the wire schema only, never on the
// server's packages) or Attach, for a server that is already running on
// loopback.
//
// The load scenarios (C2C, S2C, Group, C2S) share an open-loop driver:
// operation g of a run is due at start + g/rate whatever became of the
// earlier ones, and latency runs from that scheduled time, so a server
// that stalls shows its stall in every operation due meanwhile instead of
// slowing the clients down (no coordinated omission).
//
// The fan-out scenarios (S2C, Group) receive with a lean client by
// default (ClientRaw): thousands of logged-in connections read by a few
// goroutines (epoll on Linux) that decode only a notify's id and the
// timestamps imbench put in its content, and acknowledge everything one
// read brought in one frame, so the clients cost far less CPU than the
// server they measure. Every run reports the server's CPU time per
// operation, from /proc/<pid>/stat for processes it can see and from
// process_cpu_seconds_total otherwise.
package scenario
