package router

import (
	"context"
	"strconv"
	"time"

	"github.com/redis/rueidis"
)

// Group membership changes are announced on the channel P groups (Redis
// pub/sub), so that every logic node of the DC drops the group from its
// members cache at once. The announcement is a hint that saves a reload:
// each group message carries the membership version it was stored at, and
// a cache older than that reloads anyway (das.GroupCache), so a lost
// announcement (a node resubscribing, Redis restarting) costs nothing but
// a stale entry until the group's next message.

func (r *Redis) groupChannel() string { return r.prefix + "groups" }

// PublishGroupChange announces that group id's membership changed.
func (r *Redis) PublishGroupChange(ctx context.Context, id uint64) error {
	return r.c.Do(ctx, r.c.B().Publish().Channel(r.groupChannel()).Message(strconv.FormatUint(id, 10)).Build()).Error()
}

// SubscribeGroupChanges calls fn with the id of every group whose change
// is announced, until ctx ends. It resubscribes after a lost connection.
func (r *Redis) SubscribeGroupChanges(ctx context.Context, fn func(id uint64)) {
	for ctx.Err() == nil {
		err := r.c.Receive(ctx, r.c.B().Subscribe().Channel(r.groupChannel()).Build(), func(m rueidis.PubSubMessage) {
			if id, err := strconv.ParseUint(m.Message, 10, 64); err == nil {
				fn(id)
			}
		})
		if ctx.Err() != nil {
			return
		}
		r.log.Warn("group change subscription lost; resubscribing", "err", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Second):
		}
	}
}
