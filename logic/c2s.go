package logic

import (
	"context"
	"errors"
	"fmt"
	"strconv"

	"github.com/imd-dev/imd/bus"
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// Route maps the c2s messages of one (appcode, msgtype) to a Kafka topic.
// Adding a business line is adding a route.
type Route struct {
	AppCode uint32 `yaml:"appcode"`
	MsgType uint32 `yaml:"msgtype"`
	Topic   string `yaml:"topic"`
}

// C2S configures client-to-server messages.
type C2S struct {
	Routes []Route `yaml:"routes"`
	// MaxContent bounds a c2s message's content. Default 64 KiB less the
	// body's own fields (the frame limit applies anyway).
	MaxContent int `yaml:"max_content"`
}

type routeKey struct{ appcode, msgtype uint32 }

func (c *C2S) compile() (map[routeKey]string, error) {
	if c.MaxContent <= 0 {
		c.MaxContent = 60 << 10
	}
	m := make(map[routeKey]string, len(c.Routes))
	var errs []error
	for _, r := range c.Routes {
		k := routeKey{r.AppCode, r.MsgType}
		switch {
		case r.Topic == "":
			errs = append(errs, fmt.Errorf("c2s route appcode %d msgtype %d: no topic", r.AppCode, r.MsgType))
		case m[k] != "":
			errs = append(errs, fmt.Errorf("c2s route appcode %d msgtype %d: mapped twice", r.AppCode, r.MsgType))
		default:
			m[k] = r.Topic
		}
	}
	return m, errors.Join(errs...)
}

// Topics lists the topics of the routes, once each.
func (c *C2S) Topics() []string {
	seen := map[string]bool{}
	var out []string
	for _, r := range c.Routes {
		if !seen[r.Topic] {
			seen[r.Topic] = true
			out = append(out, r.Topic)
		}
	}
	return out
}

// Record headers of a c2s message, for the app-servers that consume it.
const (
	HeaderAppCode     = "imd-appcode"
	HeaderUID         = "imd-uid"
	HeaderAccount     = "imd-account"
	HeaderMsgType     = "imd-msgtype"
	HeaderLogID       = "imd-logid"
	HeaderMsgID       = "imd-msgid"
	HeaderClientMsgID = "imd-client-msg-id"
)

// c2s produces a client's message to the topic of its (appcode, msgtype).
// The response comes only once the broker acknowledged it (acks=all), so
// OK means "stored in Kafka". The record key is the uid: a user's
// messages stay in one partition, in order.
func (s *Service) c2s(ctx context.Context, sess router.Session, h *schema.Header, body []byte) ([]byte, error) {
	if s.bus == nil {
		return nil, schema.Errorf(schema.StatusUnavailable, "this server has no message bus")
	}
	var req pb.C2SRequest
	if err := proto.Unmarshal(body, &req); err != nil {
		return nil, badBody(h.Cmd, err)
	}
	topic := s.routes[routeKey{sess.AppCode, h.MsgType}]
	switch {
	case topic == "":
		return nil, schema.Errorf(schema.StatusUnmappedType, "no c2s route for appcode %d msgtype %d", sess.AppCode, h.MsgType)
	case len(req.Content) == 0:
		return nil, schema.Errorf(schema.StatusEmptyContent, "content is empty")
	case len(req.Content) > s.c2sMax:
		return nil, schema.Errorf(schema.StatusContentTooLarge, "content is %d bytes, over the maximum of %d", len(req.Content), s.c2sMax)
	case len(req.ClientMsgId) > s.c2c.MaxClientMsgID:
		return nil, schema.Errorf(schema.StatusBadArgument, "client_msg_id is over %d bytes", s.c2c.MaxClientMsgID)
	}
	msgid, err := s.newID(0, h.LogID)
	if err != nil {
		return nil, err
	}
	r := &bus.Record{
		Topic: topic,
		Key:   strconv.AppendUint(nil, sess.UID, 10),
		Value: req.Content,
		Headers: []bus.Header{
			{Key: HeaderAppCode, Value: strconv.AppendUint(nil, uint64(sess.AppCode), 10)},
			{Key: HeaderAccount, Value: strconv.AppendUint(nil, uint64(sess.Account), 10)},
			{Key: HeaderUID, Value: strconv.AppendUint(nil, sess.UID, 10)},
			{Key: HeaderMsgType, Value: strconv.AppendUint(nil, uint64(h.MsgType), 10)},
			{Key: HeaderLogID, Value: strconv.AppendUint(nil, h.LogID, 10)},
			{Key: HeaderMsgID, Value: strconv.AppendUint(nil, msgid, 10)},
		},
	}
	if req.ClientMsgId != "" {
		r.Headers = append(r.Headers, bus.Header{Key: HeaderClientMsgID, Value: []byte(req.ClientMsgId)})
	}
	ack, err := s.bus.Produce(ctx, r)
	if err != nil {
		s.mC2S.WithLabelValues("error").Inc()
		switch {
		case errors.Is(err, bus.ErrTooLarge):
			return nil, schema.Errorf(schema.StatusContentTooLarge, "the bus refused the record as too large")
		case errors.Is(err, context.DeadlineExceeded):
			return nil, schema.Errorf(schema.StatusTimeout, "bus: %v", err)
		}
		// Unavailable, an unknown topic (a route to a topic the cluster
		// does not have), closed: the client may retry; the record may
		// still be stored (at least once: consumers dedupe by
		// imd-client-msg-id or imd-msgid).
		return nil, schema.Errorf(schema.StatusUnavailable, "bus: %v", err)
	}
	s.mC2S.WithLabelValues("stored").Inc()
	return proto.Marshal(&pb.C2SResponse{Msgid: msgid, Partition: ack.Partition, Offset: ack.Offset})
}
