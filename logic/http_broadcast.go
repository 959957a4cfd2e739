package logic

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"strings"

	"github.com/imd-dev/imd/schema"
	"github.com/valyala/fasthttp"
)

// broadcastBody is the JSON of POST /v1/broadcast.
type broadcastBody struct {
	AppCode      uint32   `json:"appcode"` // 0 or absent: the key's own
	MsgType      uint32   `json:"msgtype"`
	Content      []byte   `json:"content"` // base64
	Text         *string  `json:"text"`    // or plain text
	StoreOffline bool     `json:"store_offline"`
	DCs          []string `json:"dcs"`
}

func handleBroadcast(svc *Service, app *App, ctx *fasthttp.RequestCtx, log *slog.Logger, logid uint64) {
	var b broadcastBody
	dec := json.NewDecoder(bytes.NewReader(ctx.PostBody()))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&b); err != nil {
		msg := "bad JSON: " + err.Error()
		if strings.Contains(err.Error(), `unknown field "to"`) {
			msg = `bad JSON: a broadcast has no "to": it goes to every online terminal of "appcode" (push to a list of users with POST /v1/push)`
		}
		writeError(ctx, fasthttp.StatusBadRequest, schema.StatusBadBody, msg)
		return
	}
	if dec.More() {
		writeError(ctx, fasthttp.StatusBadRequest, schema.StatusBadBody, "bad JSON: more than one value")
		return
	}
	switch {
	case b.StoreOffline:
		writeError(ctx, fasthttp.StatusBadRequest, schema.StatusBadArgument, "a broadcast reaches the terminals online now and is not stored for offline ones: leave store_offline out (POST /v1/push keeps a push for a list of users)")
		return
	case b.Text != nil && len(b.Content) > 0:
		writeError(ctx, fasthttp.StatusBadRequest, schema.StatusBadArgument, "give content (base64) or text, not both")
		return
	case b.Text != nil:
		b.Content = []byte(*b.Text)
	}
	res, err := svc.Broadcast(ctx, app, &BroadcastRequest{AppCode: b.AppCode, MsgType: b.MsgType, Content: b.Content, DCs: b.DCs, LogID: logid})
	if err != nil {
		writeStatusError(ctx, err)
		log.Info("broadcast refused", "appcode", app.AppCode, "err", err, "logid", logid)
		return
	}
	writeJSON(ctx, fasthttp.StatusOK, res)
}
