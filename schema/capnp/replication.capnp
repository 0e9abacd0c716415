@0xd2d5111acb1a3e1c;

# Node-to-node replication (docs/replication.md).
#
# A follower dials its leader's replication port (mTLS when configured), asks it its name
# (Leader.identify: with TLS, the leader's certificate must name that node), and only then calls
# Leader.follow with what it holds. The leader then pushes records into the follower's Sink over the same
# connection: first what the follower is missing (catch-up), then every new append. A push carries
# several records; several pushes are in flight at once (pipelined); each record is answered with
# the follower's real end offset for its point, so the leader always knows where to continue.

interface Leader {
  # Starts a session. Fails if the caller may not `replicate`, or (with TLS) if its certificate
  # does not name the follower it says it is.
  # The answer's `leaderEpoch` is the epoch at which the controller named this node its group's
  # leader (0 with no controller); every call on the sink carries it, and a follower refuses a
  # session whose epoch is older than the highest it has seen for its group.
  follow @0 (hello :Hello, sink :Sink) -> (session :Session, leaderEpoch :UInt64);

  # The leader's node name, asked before any capability is handed over, and where clients reach
  # its API (a follower names it when it refuses a write).
  identify @1 () -> (name :Text, rpcAddress :Text);

  # Resharding (docs/resharding.md): the old owner of points (`from`, the caller, whose
  # certificate must name it) hands them to this node, one point at a time. `receive` gives the
  # sink the caller pushes the handed points' bytes into (applied like a follower's, but only to
  # points this node holds as `incoming` from the caller); `handover` starts or resumes the move
  # of one point and answers what this node already holds of it; `prepare` syncs what it holds
  # before the caller fences writes; `seal` ends it: this node
  # commits `epoch + 1` if it holds exactly `end` bytes with CRC32C `crc`; `cancel` drops a move
  # the caller no longer makes.
  receive @2 (from :Text) -> (sink :Sink);
  handover @3 (from :Text, point :Text, epoch :UInt64) -> (end :UInt64);
  seal @4 (from :Text, point :Text, end :UInt64, crc :UInt32) -> (outcome :Sealed);
  cancel @5 (from :Text, point :Text) -> ();

  # Makes what this node holds of `point` (arriving from `from`) durable, before the caller
  # fences writes: the seal then syncs only the last bytes, and writers wait less.
  prepare @6 (from :Text, point :Text) -> ();

  # What this node holds of `point` after taking it over: its epoch and end, and whether its
  # copy is replicated enough for the old owner to delete its own (this node has no
  # followers, or as many confirmed all of it as its `replication.ack` asks, at least one).
  settled @7 (point :Text) -> (epoch :UInt64, end :UInt64, replicated :Bool);

  # Takeover of a forgotten primary's points (docs/resharding.md): the caller, a follower of
  # `forgotten` (its certificate must name `from`), offers its copies of points this node now
  # owns. Each gets a verdict: wait (other followers' offers are awaited), send (hand it over
  # with `receive`/`handover`/`seal`: it is the most complete copy), taken or diverged (this node
  # holds the point at a newer epoch already; see Verdict). A forgotten member that returns
  # offers its own copies (`from` = `forgotten`) and is never asked to send them.
  offer @8 (from :Text, forgotten :Text, copies :List(Copy)) -> (verdicts :List(Verdict));
}

struct Copy {
  point @0 :Text;
  end @1 :UInt64;
  epoch @2 :UInt64;
  crc @3 :UInt32;           # CRC32C of the copy's bytes [0, end)
}

enum Verdict {
  wait @0;
  send @1;
  taken @2;      # this node took the point over; the copy is a prefix of it (history)
  diverged @3;   # the copy has bytes this node does not: reported, never merged
}

struct Sealed {
  union {
    committed @0 :UInt64;  # this node owns the point at this epoch (also when asked again)
    refused @1 :Text;      # it does not hold what the caller sealed: the move starts over
  }
}

struct Hello {
  follower @0 :Text;        # the follower's node name
  rpcAddress @1 :Text;      # where clients reach the follower's API (GetFollowers, workers)
  offers @2 :List(Offer);   # every point the follower holds, with its end offset (the first
                            # page of them with `pages`)
  protocol @3 :UInt16;      # the protocol version the follower speaks (7; 0 from a release before
                            # versions existed): the leader refuses one it does not speak (it
                            # speaks 4 to 7: 4 gets no commit marks), saying so
  durable @4 :Bool;         # whether it syncs each write before it confirms it (storage.fsync =
                            # "always"): only such a follower enters its group's in-sync set
                            # (false from a follower before this field: it stays out)
  pages @5 :Bool;           # protocol 7: more offers follow, in `Session.offer` calls (a message
                            # holds `replication.offers_per_message` of them at most); the
                            # leader waits for the last before it reconciles
}

struct Offer {
  point @0 :Text;
  end @1 :UInt64;
  epoch @2 :UInt64;         # the ownership epoch of the follower's copy (docs/resharding.md): a
                            # leader never replaces a copy of a newer epoch than its own, and
                            # replaces one of an older epoch whole
  crc @3 :UInt32;           # CRC32C of the follower's [0, end): a copy whose bytes differ from the
                            # leader's at the same length is replaced, not continued
  leaderEpoch @4 :UInt64;   # protocol 6: the newest leader epoch of the copy's bytes (from where
                            # each began, `describe`'s leaderEpochs; 0: none recorded). The
                            # leader cuts the copy back to where its first newer epoch began
  committed @5 :UInt64;     # the committed end the follower serves its copy up to, as a leader
                            # told it (`commit`): a leader whose copy it continues tells it only
                            # a committed end past this one (0 from a follower before this
                            # field: each point's committed end is told again)
}

struct EpochStart {
  epoch @0 :UInt64;         # a leader epoch
  start @1 :UInt64;         # where that leader's first write of the point began
}

interface Sink {
  # Every call carries `leaderEpoch`: the epoch of the session (`Leader.follow`'s answer). A
  # follower refuses a call whose epoch is older than the highest it has seen for its group (on
  # the wire or in the controller's committed state), so a deposed leader changes nothing once a
  # newer one is known. A handover's sink ignores it (0).
  # Records in the order the leader made them. The follower applies each only if its start
  # equals its end of the point (consecutive records of a point as one batch) and answers one
  # Ack per record, in the same order.
  push @0 (records :List(Record), leaderEpoch :UInt64) -> (acks :List(Ack));

  # The point no longer exists on the leader (deleted there), or the follower's copy diverged
  # (`diverged`, protocol 5: it holds bytes the leader does not, such as a deposed leader's tail
  # that was never acknowledged): the follower removes its copy, keeping a diverged one in
  # quarantine (docs/resharding.md) rather than deleting it; the leader then sends the point
  # from 0.
  remove @1 (point :Text, leaderEpoch :UInt64, diverged :Bool) -> ();

  # What the point is besides its bytes, sent before the point's first record in a session when
  # there is something to say, and again when it changes: its content type (empty: none), its
  # ownership epoch (the follower's copy takes it) and (protocol 6) where each leader epoch
  # began in it, oldest first (the follower's copy takes the list unless it is empty). Applied
  # in order with the pushes.
  describe @2 (point :Text, contentType :Text, epoch :UInt64, leaderEpoch :UInt64,
               leaderEpochs :List(EpochStart)) -> ();

  # The follower's copy holds bytes the leader did not send (it acknowledged another end than
  # the one sent): the follower cuts it back to the end of its last append at or before `end`
  # (the leader's last verified end) and answers where it now ends; the leader continues from
  # there. Applied in order with the pushes.
  # With `diverged` (protocol 6), the copy's bytes after `end` are a deposed leader's tail: the
  # ones its successor's epoch replaced (Offer.leaderEpoch). If the copy's CRC32C of [0, end) is
  # `crc`, the follower keeps [end, its end) in quarantine and cuts back as above; otherwise the
  # copies differ before `end` too, and its whole copy goes to quarantine (it answers 0).
  truncate @3 (point :Text, end :UInt64, leaderEpoch :UInt64, crc :UInt32, diverged :Bool)
      -> (end :UInt64);

  # The leader's committed ends (protocol 5): consumers of the follower's copy are served the
  # bytes up to each, and no further (docs/failover.md). A mark never passes what the follower
  # confirmed of the point. Applied in order with the pushes.
  commit @4 (marks :List(Mark), leaderEpoch :UInt64) -> ();
}

struct Mark {
  point @0 :Text;
  end @1 :UInt64;           # the leader's committed end of the point
}

struct Record {
  point @0 :Text;           # the point and offset the leader framed: the bundler's answer on the
  start @1 :UInt64;         # follower must name the same, or the record is rejected
  bundle @2 :Data;          # what the configured bundler made of the payload
  payloadLen @3 :UInt64;    # the host's own check, whatever the bundler does: the unbundled
  payloadCrc @4 :UInt32;    # payload must be this long and have this CRC32C, or it is rejected
}

struct Ack {
  end @0 :UInt64;          # the follower's end of the record's point after handling it
  result :union {
    applied @1 :Void;      # applied at its start
    mismatch @2 :Void;     # it did not start at the follower's end: continue from `end`
    rejected @3 :Text;     # the bundler rejected it (damaged in transit, or its answer did not
                           # match the record, or its payload not the length and CRC32C the
                           # leader sent): send it again, after a pause
  }
}

interface Session {
  # The follower holds the session; dropping it, or the connection, ends replication.
  leader @0 () -> (name :Text);

  # Protocol 7: the offers after the hello's first page (`Hello.pages`), one page per call, in
  # order; `last` on the final one. The leader reconciles the follower's copies once it has
  # them all.
  offer @1 (offers :List(Offer), last :Bool) -> ();
}
