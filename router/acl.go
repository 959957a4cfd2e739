package router

import (
	"context"

	"github.com/redis/rueidis"
)

// The black and white lists (internal/acl) that the admin API sets live in
// the string key P acl, as JSON: every node polls it and applies a change
// within its poll interval. Absent until the admin API first sets them;
// each node then runs with its config file's lists.

func (r *Redis) aclKey() string { return r.prefix + "acl" }

// GetACL returns the stored lists' JSON, or nil when none is stored.
func (r *Redis) GetACL(ctx context.Context) ([]byte, error) {
	b, err := r.c.Do(ctx, r.c.B().Get().Key(r.aclKey()).Build()).AsBytes()
	if rueidis.IsRedisNil(err) {
		return nil, nil
	}
	return b, err
}

// SetACL stores the lists' JSON for every node.
func (r *Redis) SetACL(ctx context.Context, b []byte) error {
	return r.c.Do(ctx, r.c.B().Set().Key(r.aclKey()).Value(rueidis.BinaryString(b)).Build()).Error()
}
