package schema

//go:generate protoc --proto_path=proto --go_out=pb --go_opt=paths=source_relative proto/imd.proto proto/rpc.proto
