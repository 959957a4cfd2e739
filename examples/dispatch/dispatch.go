// Package dispatch is an example app-server for a freight app: it consumes
// the drivers' GPS reports that imd produces to Kafka (c2s) and, when an
// order comes in, pushes it to the drivers near the pickup through imd's
// HTTP API (s2c). cmd/dispatch wraps it in a binary; see examples/README.md.
package dispatch

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
)

// Report is the content of a driver's c2s GPS message (msgtype 1).
type Report struct {
	Lat float64 `json:"lat"`
	Lng float64 `json:"lng"`
}

// Order is pushed to the drivers near its pickup.
type Order struct {
	ID     string  `json:"id"`
	Lat    float64 `json:"lat"`
	Lng    float64 `json:"lng"`
	Cargo  string  `json:"cargo"`
	Driver uint64  `json:"-"`
}

// Config says where to read reports and where to push orders.
type Config struct {
	Brokers []string // Kafka, e.g. the embedded broker of `imd all`: 127.0.0.1:9092
	Topic   string   // the c2s topic of GPS reports (route 101/1 -> freight.gps)
	Group   string   // consumer group
	API     string   // imd's HTTP API, e.g. http://127.0.0.1:8080
	APIKey  string   // the appcode's API key (`imd token --api-key`)
	AppCode uint32   // the drivers' appcode
}

// Dispatcher tracks the drivers' last positions and dispatches orders.
type Dispatcher struct {
	cfg  Config
	http *http.Client

	mu  sync.Mutex
	pos map[uint64]Report // uid -> last position
}

// New returns a Dispatcher.
func New(cfg Config) *Dispatcher {
	return &Dispatcher{cfg: cfg, http: &http.Client{Timeout: 10 * time.Second}, pos: map[uint64]Report{}}
}

// Consume reads GPS reports until ctx ends. The record key is the driver's
// uid (imd keys c2s records by uid, so a driver's reports stay in order).
func (d *Dispatcher) Consume(ctx context.Context) error {
	cl, err := kgo.NewClient(kgo.SeedBrokers(d.cfg.Brokers...), kgo.ConsumerGroup(d.cfg.Group),
		kgo.ConsumeTopics(d.cfg.Topic), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	if err != nil {
		return err
	}
	defer cl.Close()
	for ctx.Err() == nil {
		fs := cl.PollFetches(ctx)
		fs.EachRecord(func(r *kgo.Record) {
			uid, err := strconv.ParseUint(string(r.Key), 10, 64)
			var rep Report
			if err != nil || json.Unmarshal(r.Value, &rep) != nil {
				return // not a GPS report: skip it
			}
			d.mu.Lock()
			d.pos[uid] = rep
			d.mu.Unlock()
		})
	}
	return nil
}

// Known returns how many drivers have reported.
func (d *Dispatcher) Known() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.pos)
}

// Near returns the drivers within km of (lat, lng), nearest first.
func (d *Dispatcher) Near(lat, lng, km float64) []uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	type cand struct {
		uid  uint64
		dist float64
	}
	var cs []cand
	for uid, p := range d.pos {
		if dist := haversineKm(lat, lng, p.Lat, p.Lng); dist <= km {
			cs = append(cs, cand{uid, dist})
		}
	}
	sort.Slice(cs, func(i, j int) bool { return cs[i].dist < cs[j].dist })
	out := make([]uint64, len(cs))
	for i, c := range cs {
		out[i] = c.uid
	}
	return out
}

// PushResult is imd's answer to a push (the fields this example reads).
type PushResult struct {
	PushID string `json:"push_id"`
	Online int    `json:"online"`
}

// Dispatch pushes o to the drivers within km of its pickup, with one HTTP
// call, and returns imd's answer. Offline drivers miss it: an order is
// only worth something now.
func (d *Dispatcher) Dispatch(ctx context.Context, o Order, km float64) (*PushResult, []uint64, error) {
	drivers := d.Near(o.Lat, o.Lng, km)
	if len(drivers) == 0 {
		return nil, nil, nil
	}
	type rcpt struct {
		AppCode uint32 `json:"appcode"`
		UID     uint64 `json:"uid"`
	}
	to := make([]rcpt, len(drivers))
	for i, uid := range drivers {
		to[i] = rcpt{d.cfg.AppCode, uid}
	}
	text, _ := json.Marshal(o)
	body, _ := json.Marshal(map[string]any{"to": to, "msgtype": 2, "text": string(text), "store_offline": false})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, d.cfg.API+"/v1/push", bytes.NewReader(body))
	if err != nil {
		return nil, nil, err
	}
	req.Header.Set("Authorization", "Bearer "+d.cfg.APIKey)
	req.Header.Set("Content-Type", "application/json")
	resp, err := d.http.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var e struct {
			Error struct{ Message string } `json:"error"`
		}
		_ = json.NewDecoder(resp.Body).Decode(&e)
		return nil, nil, fmt.Errorf("push: HTTP %d: %s", resp.StatusCode, e.Error.Message)
	}
	var pr PushResult
	if err := json.NewDecoder(resp.Body).Decode(&pr); err != nil {
		return nil, nil, err
	}
	return &pr, drivers, nil
}

func haversineKm(lat1, lng1, lat2, lng2 float64) float64 {
	const r = 6371.0
	rad := math.Pi / 180
	dlat, dlng := (lat2-lat1)*rad, (lng2-lng1)*rad
	a := math.Sin(dlat/2)*math.Sin(dlat/2) + math.Cos(lat1*rad)*math.Cos(lat2*rad)*math.Sin(dlng/2)*math.Sin(dlng/2)
	return 2 * r * math.Asin(math.Sqrt(a))
}
