package sdk

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"sync"
)

// StateStore keeps what a client must remember across process restarts so
// that a terminal shows no message twice and keeps its sent messages in
// order: the ids (c2c msgids and s2c push ids) it has shown to the app, and
// the highest msgid it was answered for a message it sent (see
// Options.State). FileState is a ready implementation; an app may keep the
// same records in its own database instead.
//
// One store belongs to one terminal (appcode, uid and DeviceID) and is used
// by one Client at a time. The client calls Load once, in Dial, and the
// other methods from its own goroutines, possibly concurrently.
//
// A store may also have a method Sync() error: the client then calls it
// before it sends acknowledgements (once per batch), so a store can leave
// SaveShown's records in the operating system's cache, where they survive
// a kill of the process, and make them durable against a crash of the
// device only when it matters.
type StateStore interface {
	// Load returns what was saved before.
	Load() (SavedState, error)
	// SaveShown records ids the app has been shown. The client calls it
	// as soon as a callback (OnC2C, OnS2C) returned, and before it queues
	// the acknowledgement that removes the id from the inbox; once it
	// returns nil the ids must be readable by the next Load even if the
	// process is killed. A store may forget the oldest ids beyond
	// Options.DedupSize.
	SaveShown(ids []uint64) error
	// SaveSent records msgid as the highest msgid this terminal has been
	// answered for a message it sent, before the send returns. It is
	// called with increasing values only.
	SaveSent(msgid uint64) error
}

// SavedState is what a StateStore gives back at Dial.
type SavedState struct {
	// Shown are the ids shown to the app, oldest first. The client keeps
	// the last Options.DedupSize of them to drop copies delivered again.
	Shown []uint64
	// SentMsgid is the highest msgid the terminal was answered for a
	// message it sent (0 if none): the floor of its next send.
	SentMsgid uint64
	// GroupSeqs holds, per group id, the last seq shown to the app
	// (OnGroup), as recorded by a GroupStateStore; nil from a store that
	// is not one.
	GroupSeqs map[uint64]uint64
}

var _ GroupStateStore = (*FileStore)(nil)

// defaultKeep is how many shown ids FileState keeps by default: the
// default Options.DedupSize.
const defaultKeep = 16384

// FileStore is the StateStore (and GroupStateStore) returned by FileState.
type FileStore struct {
	mu     sync.Mutex
	path   string
	keep   int
	f      *os.File
	shown  []uint64 // the last keep ids, oldest first
	sent   uint64
	groups map[uint64]uint64 // the last seq shown per group
	lines  int               // records in the file, to know when to compact it
	dirty  bool              // written since the last fsync
	buf    []byte
}

// FileState opens (or creates) the state file at path and returns a store
// that keeps the last keep shown ids (keep <= 0 means 16384, the default
// DedupSize; give the client's DedupSize if it is larger) and the last
// seq shown of every group.
//
// The file is a log of text records, one a line, appended to with one
// write per call. Fsync policy: SaveShown and SaveGroupSeq (called once
// per message shown) only write, which survives the process being killed; Sync, which the
// client calls before each batch of acknowledgements (at most every
// Options.AckDelay, and before each offline page is acknowledged), fsyncs,
// so what was acknowledged also survives a crash of the device. SaveSent
// writes and fsyncs at once. A last line torn by a crash during a write is
// ignored and cut off when the file is opened again. When the log holds
// about twice keep records (plus twice one per group) it is rewritten (to
// a temporary file that is fsynced and renamed over the old one), so it
// stays around keep lines and one per group.
//
// Call Close when no client uses the store any more; a client does not
// close the store it was given.
func FileState(path string, keep int) (*FileStore, error) {
	if keep <= 0 {
		keep = defaultKeep
	}
	s := &FileStore{path: path, keep: keep}
	if err := s.open(); err != nil {
		return nil, err
	}
	return s, nil
}

// open reads the log, cuts off a torn last line, and opens the file for
// appending.
func (s *FileStore) open() error {
	f, err := os.OpenFile(s.path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("sdk: state file: %w", err)
	}
	r := bufio.NewReader(f)
	var good int64 // bytes of complete lines
	for {
		line, err := r.ReadBytes('\n')
		if err == io.EOF {
			break // a last line without its newline is torn: dropped
		}
		if err != nil {
			_ = f.Close()
			return fmt.Errorf("sdk: state file: %w", err)
		}
		good += int64(len(line))
		s.parse(bytes.TrimSuffix(line, []byte("\n")))
	}
	if st, err := f.Stat(); err == nil && st.Size() != good {
		if err := f.Truncate(good); err != nil {
			_ = f.Close()
			return fmt.Errorf("sdk: state file: cut a torn line: %w", err)
		}
	}
	if _, err := f.Seek(good, io.SeekStart); err != nil {
		_ = f.Close()
		return fmt.Errorf("sdk: state file: %w", err)
	}
	s.f = f
	if s.lines > s.limit() {
		return s.compact()
	}
	return nil
}

// limit is how many records the log holds before it is compacted: twice
// what a compaction leaves.
func (s *FileStore) limit() int {
	return 2 * (s.keep + len(s.groups))
}

// parse applies one record: "s <id>" (shown), "a <msgid>" (sent floor)
// or "g <group> <seq>" (the last seq of a group shown). A line that does
// not parse (a corrupt block) is skipped.
func (s *FileStore) parse(line []byte) {
	if len(line) < 3 || line[1] != ' ' {
		return
	}
	if line[0] == 'g' {
		g, seq, ok := bytes.Cut(line[2:], []byte(" "))
		if !ok {
			return
		}
		id, err1 := strconv.ParseUint(string(g), 10, 64)
		v, err2 := strconv.ParseUint(string(seq), 10, 64)
		if err1 != nil || err2 != nil {
			return
		}
		s.setGroup(id, v)
		s.lines++
		return
	}
	v, err := strconv.ParseUint(string(line[2:]), 10, 64)
	if err != nil {
		return
	}
	switch line[0] {
	case 's':
		s.addShown(v)
	case 'a':
		s.sent = max(s.sent, v)
	default:
		return
	}
	s.lines++
}

func (s *FileStore) addShown(id uint64) {
	s.shown = append(s.shown, id)
	if len(s.shown) > 2*s.keep {
		s.shown = append(s.shown[:0], s.shown[len(s.shown)-s.keep:]...)
	}
}

func (s *FileStore) setGroup(id, seq uint64) {
	if s.groups == nil {
		s.groups = make(map[uint64]uint64)
	}
	s.groups[id] = max(s.groups[id], seq)
}

// Load implements StateStore.
func (s *FileStore) Load() (SavedState, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	shown := s.shown
	if len(shown) > s.keep {
		shown = shown[len(shown)-s.keep:]
	}
	st := SavedState{Shown: append([]uint64(nil), shown...), SentMsgid: s.sent}
	if len(s.groups) > 0 {
		st.GroupSeqs = make(map[uint64]uint64, len(s.groups))
		for g, seq := range s.groups {
			st.GroupSeqs[g] = seq
		}
	}
	return st, nil
}

// SaveGroupSeq implements GroupStateStore. Like SaveShown it only writes;
// Sync makes the record durable.
func (s *FileStore) SaveGroupSeq(groupID, seq uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if seq <= s.groups[groupID] {
		return nil
	}
	s.setGroup(groupID, seq)
	b := strconv.AppendUint(append(s.buf[:0], 'g', ' '), groupID, 10)
	b = strconv.AppendUint(append(b, ' '), seq, 10)
	s.buf = append(b, '\n')
	return s.append(s.buf, 1, false)
}

// SaveShown implements StateStore.
func (s *FileStore) SaveShown(ids []uint64) error {
	if len(ids) == 0 {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	b := s.buf[:0]
	for _, id := range ids {
		b = append(b, 's', ' ')
		b = strconv.AppendUint(b, id, 10)
		b = append(b, '\n')
	}
	s.buf = b
	// The ids join the memory first: a compaction in append rewrites the
	// file from it.
	for _, id := range ids {
		s.addShown(id)
	}
	return s.append(b, len(ids), false)
}

// Sync makes the records written so far durable (fsync).
func (s *FileStore) Sync() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.f == nil || !s.dirty {
		return nil
	}
	if err := s.f.Sync(); err != nil {
		return fmt.Errorf("sdk: state file: %w", err)
	}
	s.dirty = false
	return nil
}

// SaveSent implements StateStore.
func (s *FileStore) SaveSent(msgid uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if msgid <= s.sent {
		return nil
	}
	b := strconv.AppendUint(append(s.buf[:0], 'a', ' '), msgid, 10)
	s.buf = append(b, '\n')
	s.sent = msgid
	return s.append(s.buf, 1, true)
}

// append writes n records (and fsyncs them when sync is set), then
// compacts the log when it is long.
func (s *FileStore) append(b []byte, n int, sync bool) error {
	if s.f == nil {
		return errors.New("sdk: state file closed")
	}
	if _, err := s.f.Write(b); err != nil {
		return fmt.Errorf("sdk: state file: %w", err)
	}
	s.dirty = true
	if sync {
		if err := s.f.Sync(); err != nil {
			return fmt.Errorf("sdk: state file: %w", err)
		}
		s.dirty = false
	}
	s.lines += n
	if s.lines > s.limit() {
		return s.compact()
	}
	return nil
}

// compact rewrites the log with the last keep shown ids, the sent floor
// and the group positions.
func (s *FileStore) compact() error {
	if len(s.shown) > s.keep {
		s.shown = append(s.shown[:0], s.shown[len(s.shown)-s.keep:]...)
	}
	var b []byte
	for _, id := range s.shown {
		b = append(b, 's', ' ')
		b = strconv.AppendUint(b, id, 10)
		b = append(b, '\n')
	}
	if s.sent > 0 {
		b = append(strconv.AppendUint(append(b, 'a', ' '), s.sent, 10), '\n')
	}
	for g, seq := range s.groups {
		b = strconv.AppendUint(append(b, 'g', ' '), g, 10)
		b = append(strconv.AppendUint(append(b, ' '), seq, 10), '\n')
	}
	tmp := s.path + ".tmp"
	err := writeSynced(tmp, b)
	if err == nil {
		err = os.Rename(tmp, s.path)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("sdk: state file: compact: %w", err)
	}
	if d, err := os.Open(filepath.Dir(s.path)); err == nil {
		_ = d.Sync() // make the rename itself durable
		_ = d.Close()
	}
	_ = s.f.Close()
	s.f = nil // saves fail rather than go to the replaced file
	f, err := os.OpenFile(s.path, os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("sdk: state file: %w", err)
	}
	s.f = f
	s.dirty = false // the rewritten file was fsynced
	s.lines = len(s.shown) + len(s.groups)
	if s.sent > 0 {
		s.lines++
	}
	return nil
}

func writeSynced(path string, b []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err = f.Write(b); err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// Close closes the file. Later saves fail.
func (s *FileStore) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.f == nil {
		return nil
	}
	err := s.f.Close()
	s.f = nil
	return err
}
