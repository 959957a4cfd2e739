package sdk

import "runtime"

// Version is sent to the server at login.
const Version = "imd-go-sdk/0.1"

func runtimeYield() { runtime.Gosched() }
