"""The host's bookkeeping of a rollout: which prompts wait, which group slot each live prompt holds, and which blocks
of the paged key/value store (rollout/kv_pages.py) each prompt and each response row holds. Pure Python, no tensors:
the engine (rollout/engine.py) applies its decisions to the device, and bench/kv_plan.py drives the same class with
simulated response lengths.

The store is a pool of blocks of `block_size` tokens. A prompt's keys/values take ceil(T / block_size) blocks, shared
by its G rows; each row's response takes blocks as it grows, one block at a time, and gives them back when the row
stops. So the prompts in flight follow the tokens actually generated, not the longest response a row could reach.
  admit:   a waiting prompt enters while its prompt blocks, a first block for each row, one block of growth for
           every live row and a headroom (5% of the blocks) fit in the free blocks;
  grow:    before each run of n decode steps every live row gets the blocks its next n tokens need;
  preempt: if they do not fit, the most recently admitted prompt gives back all its blocks and waits again at the
           front of the queue; it is recomputed later from its prompt, with the same random numbers per row (so the
           same samples). The last prompt in flight is never preempted: a budget below one whole group is refused;
  finish:  a stopped row gives back its response blocks at once; a prompt whose rows all stopped gives back its prompt
           blocks and its slot.
Block 0 is never handed out: tables point unused entries at it, and rows that stopped write their (ignored) keys there.
"""
from collections import deque
from dataclasses import dataclass, field


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


@dataclass
class Group:
    """One prompt in flight: its G rows share its prompt blocks; rows[j] are row j's response blocks."""
    prompt: int                 # index into the call's prompts
    slot: int                   # group slot: rows slot * G ... slot * G + G - 1 of the device state
    prompt_blocks: list
    rows: list                  # per row: list of block ids, in position order
    done: list                  # per row: stopped (or reached max_new_tokens)
    lengths: list               # per row: response tokens at the last look (an upper bound is kept between looks)
    steps: int = 0              # decode steps run since admission
    order: int = 0              # admission counter: preemption takes the largest


@dataclass
class Scheduler:
    num_blocks: int             # blocks in the pool, block 0 included (never used)
    block_size: int
    group_size: int
    max_new_tokens: int
    slots: int                  # group slots of the device state
    prompt_lens: list           # tokens of each prompt of the call
    reserve_full: bool = False  # the static reservation (bench/kv_plan.py's baseline): each row's max_new_tokens
                                # of blocks at admission, nothing later, no preemption
    headroom: float = 0.05      # admission keeps this fraction of the blocks free for the live rows to grow into
                                # (bench/kv_plan.py at the 8B shape: 0 -> 354 preemptions, 11.6% of the tokens
                                # recomputed; 0.05 -> 86, 6%; 0.1 -> 62, 4.7%, and 6% fewer rows in flight)
    waiting: deque = field(default_factory=deque)
    live: dict = field(default_factory=dict)    # slot -> Group
    free: list = field(default_factory=list)
    preemptions: int = 0
    _admitted: int = 0

    def __post_init__(self):
        self.waiting = deque(range(len(self.prompt_lens)))
        self.free = list(range(self.num_blocks - 1, 0, -1))  # pop() hands out low ids first
        need = self.group_blocks(max(self.prompt_lens), self.max_new_tokens)
        if need > self.num_blocks - 1:
            raise ValueError(f"the KV budget holds {self.num_blocks - 1} blocks of {self.block_size} tokens; one "
                             f"group needs {need} (its prompt of {max(self.prompt_lens)} tokens and "
                             f"{self.group_size} x {self.max_new_tokens} new tokens)")

    # ---- sizes
    def group_blocks(self, prompt_len: int, response_len: int) -> int:
        """Blocks one group holds with every row at response_len tokens."""
        return blocks_for(prompt_len, self.block_size) + self.group_size * blocks_for(response_len, self.block_size)

    def held(self) -> int:
        return self.num_blocks - 1 - len(self.free)

    def live_rows(self) -> int:
        return sum(not d for g in self.live.values() for d in g.done)

    # ---- moves
    def _take(self, n: int) -> list:
        return [self.free.pop() for _ in range(n)]

    def admit(self, steps: int, limit: int | None = None) -> list[Group]:
        """Admit waiting prompts into free slots while they fit (see the module docstring); at most `limit`. A new
        group holds its prompt blocks and its rows' blocks for the next `steps` decode steps (all max_new_tokens of
        them in the static reservation)."""
        out = []
        per_row = blocks_for(self.max_new_tokens if self.reserve_full else min(steps, self.max_new_tokens),
                             self.block_size)
        while self.waiting and len(self.live) < self.slots and (limit is None or len(out) < limit):
            i = self.waiting[0]
            prompt = blocks_for(self.prompt_lens[i], self.block_size)
            growth = 0 if self.reserve_full else \
                self.live_rows() * blocks_for(steps, self.block_size) + int(self.headroom * (self.num_blocks - 1))
            if prompt + self.group_size * per_row + growth > len(self.free):
                break
            self.waiting.popleft()
            slot = min(set(range(self.slots)) - set(self.live))
            self._admitted += 1
            rows = [self._take(per_row) for _ in range(self.group_size)]
            g = Group(prompt=i, slot=slot, prompt_blocks=self._take(prompt), rows=rows,
                      done=[False] * self.group_size, lengths=[1] * self.group_size, order=self._admitted)
            self.live[slot] = g
            out.append(g)
        return out

    def row_entries(self, groups: list[Group]) -> list[tuple[int, int, int]]:
        """Response table entries (row, position index, block) of these groups' rows, as the device needs them."""
        G = self.group_size
        return [(g.slot * G + j, k, b) for g in groups for j in range(G) for k, b in enumerate(g.rows[j])]

    def grow(self, steps: int) -> tuple[list[Group], list[tuple[int, int, int]]]:
        """Blocks for the next `steps` decode steps of every live row. Returns (preempted groups, new response table
        entries (row, position index, block), row = slot * G + j)."""
        preempted = []
        if self.reserve_full:
            return preempted, []
        while True:
            need = {}
            for g in self.live.values():
                for j in range(self.group_size):
                    if not g.done[j]:
                        # the step at length L writes position L - 1; n steps write up to L + n - 2
                        want = blocks_for(min(g.lengths[j] + steps - 1, self.max_new_tokens), self.block_size)
                        if want > len(g.rows[j]):
                            need[(g.slot, j)] = want - len(g.rows[j])
            if sum(need.values()) <= len(self.free) or len(self.live) == 1:
                break
            victim = max(self.live.values(), key=lambda g: g.order)
            self._release(victim)
            self.waiting.appendleft(victim.prompt)
            self.preemptions += 1
            preempted.append(victim)
        entries = []
        for (slot, j), n in need.items():
            g = self.live[slot]
            for _ in range(n):
                entries.append((slot * self.group_size + j, len(g.rows[j]), self.free.pop()))
                g.rows[j].append(entries[-1][2])
        return preempted, entries

    def stepped(self, n: int) -> None:
        """n decode steps ran: lengths are upper bounds until the next look."""
        for g in self.live.values():
            g.steps += n
            for j in range(self.group_size):
                if not g.done[j]:
                    g.lengths[j] = min(g.lengths[j] + n, self.max_new_tokens)

    def looked(self, done: dict, lengths: dict) -> tuple[list[tuple[int, int]], list[Group]]:
        """The device's done flags and lengths per slot (lists of G): stopped rows give back their response blocks;
        groups whose rows all stopped leave. Returns (rows whose blocks were freed, as (slot, j); finished groups)."""
        freed, finished = [], []
        for slot, g in list(self.live.items()):
            for j in range(self.group_size):
                g.lengths[j] = lengths[slot][j]
                if done[slot][j] and not g.done[j]:
                    g.done[j] = True
                    if not self.reserve_full:
                        self.free.extend(reversed(g.rows[j]))
                        g.rows[j] = []
                        freed.append((slot, j))
            if all(g.done):
                self._release(g)
                finished.append(g)
        return freed, finished

    def _release(self, g: Group) -> None:
        for blocks in [g.prompt_blocks] + g.rows:
            self.free.extend(reversed(blocks))
        g.prompt_blocks, g.rows = [], [[] for _ in range(self.group_size)]
        del self.live[g.slot]

    def compact(self) -> list[tuple[int, int]]:
        """With nothing waiting, move live groups into the lowest slots so that later steps run fewer rows. Returns
        the moves (src slot, dst slot), in order."""
        if self.waiting:
            return []
        moves = []
        for dst, src in enumerate(sorted(self.live)):
            if dst != src:
                g = self.live.pop(src)
                g.slot = dst
                self.live[dst] = g
                moves.append((src, dst))
        return moves

    def groups_in_step(self) -> int:
        """Group slots a step must run: up to the highest live slot."""
        return max(self.live) + 1 if self.live else 0
