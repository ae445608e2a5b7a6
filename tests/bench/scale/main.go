// cairn-scale: the client side of tests/bench/scale.py, on etcd 3.4's own Go client
// (clientv3, built from Debian's etcd source by tests/bench/etcd-tools.sh). Each command
// prints one line of key=value figures.
//
//	load    -total N -val-size B -clients C -conns K [-prefix P]
//	        puts N keys P%09d with distinct random values (etcd's `benchmark put` sends one
//	        value for every key, which compresses to nothing)
//	range   one full keys-only range of the prefix (linearizable)
//	probe   -duration D -readers R: one writer putting small keys one at a time while R
//	        clients loop full keys-only ranges; the writer's latencies
//	compact -duration D: the same writer; after 3 s, a physical compaction at the current
//	        revision; the writer's latencies before and during it, and how long it took
package main

import (
	"context"
	"flag"
	"fmt"
	"math"
	"math/rand"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/clientv3"
)

var (
	endpoints = flag.String("endpoints", "127.0.0.1:2379", "comma-separated endpoints")
	total     = flag.Int("total", 1000000, "keys to load")
	valSize   = flag.Int("val-size", 1024, "value bytes")
	clients   = flag.Int("clients", 64, "concurrent writers for load")
	conns     = flag.Int("conns", 8, "connections for load")
	prefix    = flag.String("prefix", "key-", "key prefix")
	duration  = flag.Duration("duration", 20*time.Second, "probe duration")
	readers   = flag.Int("readers", 2, "clients looping full ranges during probe")
)

func connect() *clientv3.Client {
	c, err := clientv3.New(clientv3.Config{
		Endpoints:          strings.Split(*endpoints, ","),
		DialTimeout:        10 * time.Second,
		MaxCallRecvMsgSize: math.MaxInt32,
	})
	if err != nil {
		fail(err)
	}
	return c
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "cairn-scale:", err)
	os.Exit(1)
}

func load() {
	cs := make([]*clientv3.Client, *conns)
	for i := range cs {
		cs[i] = connect()
	}
	var next int64 = -1
	var wg sync.WaitGroup
	errs := make(chan error, *clients)
	start := time.Now()
	for w := 0; w < *clients; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			c := cs[w%len(cs)]
			rnd := rand.New(rand.NewSource(int64(w) + time.Now().UnixNano()))
			val := make([]byte, *valSize)
			for {
				i := atomic.AddInt64(&next, 1)
				if i >= int64(*total) {
					return
				}
				rnd.Read(val)
				_, err := c.Put(context.Background(), fmt.Sprintf("%s%09d", *prefix, i), string(val))
				if err != nil {
					errs <- err
					return
				}
			}
		}(w)
	}
	wg.Wait()
	secs := time.Since(start).Seconds()
	select {
	case err := <-errs:
		fail(err)
	default:
	}
	fmt.Printf("load_seconds=%.2f rate=%.0f\n", secs, float64(*total)/secs)
}

func fullRange(c *clientv3.Client) (int, error) {
	r, err := c.Get(context.Background(), *prefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return 0, err
	}
	return len(r.Kvs), nil
}

func rangeOnce() {
	c := connect()
	start := time.Now()
	n, err := fullRange(c)
	if err != nil {
		fail(err)
	}
	fmt.Printf("range_seconds=%.2f count=%d\n", time.Since(start).Seconds(), n)
}

// writer puts small keys one at a time until stop closes; latencies go to lat.
func writer(c *clientv3.Client, stop <-chan struct{}, record func(time.Duration)) error {
	for i := 0; ; i++ {
		select {
		case <-stop:
			return nil
		default:
		}
		t := time.Now()
		if _, err := c.Put(context.Background(), fmt.Sprintf("probe-%d", i%1000), "v"); err != nil {
			return err
		}
		record(time.Since(t))
	}
}

type latencies struct {
	mu sync.Mutex
	d  []time.Duration
}

func (l *latencies) add(d time.Duration) {
	l.mu.Lock()
	l.d = append(l.d, d)
	l.mu.Unlock()
}

func (l *latencies) summary() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.d) == 0 {
		return "puts=0 p99_ms=nan max_ms=nan"
	}
	sort.Slice(l.d, func(i, j int) bool { return l.d[i] < l.d[j] })
	p99 := l.d[(len(l.d)*99)/100]
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	return fmt.Sprintf("puts=%d p99_ms=%.1f max_ms=%.1f", len(l.d), ms(p99), ms(l.d[len(l.d)-1]))
}

func probe() {
	w := connect()
	stop := make(chan struct{})
	var ranges int64
	var wg sync.WaitGroup
	var rangeErr atomic.Value
	for r := 0; r < *readers; r++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := connect()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := fullRange(c); err != nil {
					rangeErr.Store(err)
					return
				}
				atomic.AddInt64(&ranges, 1)
			}
		}()
	}
	var lat latencies
	done := make(chan error, 1)
	go func() { done <- writer(w, stop, lat.add) }()
	time.Sleep(*duration)
	close(stop)
	if err := <-done; err != nil {
		fail(err)
	}
	wg.Wait()
	if err, ok := rangeErr.Load().(error); ok {
		fail(err)
	}
	fmt.Printf("%s ranges=%d\n", lat.summary(), ranges)
}

func compact() {
	w, c := connect(), connect()
	stop := make(chan struct{})
	var before, during latencies
	var compacting int32
	done := make(chan error, 1)
	go func() {
		done <- writer(w, stop, func(d time.Duration) {
			if atomic.LoadInt32(&compacting) == 1 {
				during.add(d)
			} else {
				before.add(d)
			}
		})
	}()
	time.Sleep(3 * time.Second)
	r, err := c.Get(context.Background(), "probe-0")
	if err != nil {
		fail(err)
	}
	atomic.StoreInt32(&compacting, 1)
	t := time.Now()
	if _, err := c.Compact(context.Background(), r.Header.Revision, clientv3.WithCompactPhysical()); err != nil {
		fail(err)
	}
	took := time.Since(t)
	atomic.StoreInt32(&compacting, 2)
	close(stop)
	if err := <-done; err != nil {
		fail(err)
	}
	fmt.Printf("compact_seconds=%.2f revision=%d before: %s during: %s\n",
		took.Seconds(), r.Header.Revision, before.summary(), during.summary())
}

func main() {
	if len(os.Args) < 2 {
		fail(fmt.Errorf("usage: cairn-scale load|range|probe|compact [flags]"))
	}
	cmd := os.Args[1]
	flag.CommandLine.Parse(os.Args[2:])
	switch cmd {
	case "load":
		load()
	case "range":
		rangeOnce()
	case "probe":
		probe()
	case "compact":
		compact()
	default:
		fail(fmt.Errorf("unknown command %q", cmd))
	}
}
