"""Templates for synthetic grade-school word problems, the training side of the `math` domain.

Their scenarios and wording were written apart from the evaluation set (math_prompts.py), and
`engine.train.synthetic` also drops any draw that comes near an evaluation problem.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from fractions import Fraction

# Each template returns (problem text, numeric answer); the answer keeps draws well posed
# (positive change, whole counts) and lets tests measure variety.
Template = Callable[[random.Random], tuple[str, float]]

NAMES = (
    "Aiden", "Bella", "Chloe", "Diego", "Elena", "Farah", "Gavin", "Hana", "Isaac", "Jonas", "Kira", "Lucas",
    "Mila", "Nadia", "Oscar", "Paula", "Quinn", "Rosa", "Sofia", "Theo", "Uma", "Victor", "Wendy", "Xavier",
    "Yusuf", "Zara", "Amir", "Bianca", "Chen", "Dana", "Ethan", "Fatima", "Grace", "Hugo", "Ines", "Kenji",
    "Leah", "Mateo", "Olivia", "Pedro", "Ruby", "Sara", "Tariq", "Vera", "Willow", "Yara", "Arjun", "Mei",
)
SHOP_ITEMS = (("notebook", 1, 6), ("sandwich", 4, 9), ("toy car", 3, 12), ("scarf", 8, 25), ("mug", 5, 14),
              ("pack of batteries", 3, 10), ("comic book", 2, 8), ("plant pot", 4, 15), ("T-shirt", 9, 24),
              ("bag of rice", 6, 18), ("candle", 2, 9), ("puzzle", 7, 20), ("water bottle", 5, 16))
THINGS = ("stamps", "seashells", "trading cards", "beads", "stickers", "coins", "pencils", "postcards",
          "buttons", "rocks", "crayons", "ribbons", "keychains", "bottle caps")
FRUITS = ("apples", "oranges", "bananas", "pears", "peaches", "plums", "lemons", "mangoes")
VEHICLES = (("bus", 30, 70), ("truck", 40, 80), ("car", 45, 100), ("motorbike", 40, 90), ("van", 35, 75))
OPENERS = ("", "", "", "", "Solve this problem: ", "Here is a word problem. ", "Math question: ")
CLOSERS = ("", "", "", "", " Show your work.", " Explain each step.", " Give the final answer at the end.")


def money(x: float) -> str:
    return f"${x:,.2f}" if round(x, 2) != int(x) else f"${int(x):,}"


def num(x: float) -> str:
    return f"{x:,}" if float(x).is_integer() else f"{x:g}"


def plural(item: str) -> str:
    head, sep, tail = item.partition(" of ")
    return head + "s" + sep + tail  # "pack of batteries" -> "packs of batteries"


def two_names(r: random.Random) -> tuple[str, str]:
    a, b = r.sample(NAMES, 2)
    return a, b


def t_change(r: random.Random) -> tuple[str, float]:
    who, (item, lo, hi) = r.choice(NAMES), r.choice(SHOP_ITEMS)
    n, price = r.randint(2, 6), r.randint(lo * 4, hi * 4) / 4
    bill = next(b for b in (10, 20, 50, 100, 200) if b > n * price)
    ask = r.choice(("How much money should {w} get back?", "What is {w}'s change?",
                    "How much change does the cashier give {w}?"))
    return (f"{who} picks out {n} {plural(item)} priced at {money(price)} apiece and hands the cashier a "
            f"{money(bill)} note. " + ask.format(w=who)), bill - n * price


def t_discount(r: random.Random) -> tuple[str, float]:
    item, lo, hi = r.choice(SHOP_ITEMS)
    price, pct = r.randint(lo, hi) * 5, r.choice((10, 20, 25, 30, 40, 50))
    n = r.randint(2, 5)
    return (f"A store marks every {item} down by {pct}%. Each one normally sells for {money(price)}. "
            f"{r.choice(NAMES)} wants {n} of them. What will they cost altogether after the markdown?"
            ), n * price * (100 - pct) / 100


def t_unit_price(r: random.Random) -> tuple[str, float]:
    fruit, a, b = r.choice(FRUITS), r.choice((4, 5, 6, 8)), r.choice((10, 12, 15, 20))
    ca = r.randint(30, 70)
    cb = ca + r.choice((-1, 1)) * r.randint(3, 15)  # cents per piece; never a tie
    pa, pb = a * ca / 100, b * cb / 100
    return (f"Market stall A sells {fruit} at {a} for {money(pa)}. Stall B sells {b} {fruit} for {money(pb)}. "
            f"Which stall is cheaper per piece of fruit, and by how many cents per piece?"), abs(pa / a - pb / b) * 100


def t_budget(r: random.Random) -> tuple[str, float]:
    who, (item, lo, hi) = r.choice(NAMES), r.choice(SHOP_ITEMS)
    price, budget = r.randint(lo, hi), r.randint(30, 120)
    q = r.choice(("What is the largest number of {i} {w} can afford, and how much money is left?",
                  "How many {i} can {w} buy at most, and what is left over?"))
    return (f"{who} has {money(budget)} to spend, and a {item} costs {money(price)}. "
            + q.format(i=plural(item), w=who)), budget // price


def t_chores(r: random.Random) -> tuple[str, float]:
    who, pay, k, weeks = r.choice(NAMES), r.choice((2, 3, 4, 5, 6)), r.randint(3, 9), r.randint(3, 8)
    frac = r.choice((Fraction(1, 2), Fraction(1, 3), Fraction(1, 4)))
    earned = pay * k * weeks
    return (f"{who} gets {money(pay)} for each chore and does {k} chores a week. After {weeks} weeks "
            f"{who} spends {frac} of the earnings on a game. How much of the money is left?"), float(earned * (1 - frac))


def t_two_legs(r: random.Random) -> tuple[str, float]:
    veh, lo, hi = r.choice(VEHICLES)
    v1, v2 = r.randrange(lo, hi, 5), r.randrange(lo, hi, 5)
    t1, t2 = r.choice((1.5, 2, 2.5, 3)), r.choice((0.5, 1.5, 2))
    q = r.choice(("What total distance does it cover?", "How many kilometers does it travel in all?",
                  "What is its average speed over the whole trip?"))
    d = v1 * t1 + v2 * t2
    answer = d / (t1 + t2) if "average" in q else d
    return f"A {veh} drives for {num(t1)} hours at {v1} km/h, then for {num(t2)} hours at {v2} km/h. {q}", answer


def t_trip_minutes(r: random.Random) -> tuple[str, float]:
    who, speed, d = r.choice(NAMES), r.choice((4, 5, 6, 10, 12, 15, 18, 20)), r.choice((2, 3, 4, 5, 6, 8, 9, 10))
    mode = "walks" if speed <= 6 else "cycles"
    return (f"{who} {mode} to the lake, which is {d} km away, at a steady {speed} km/h. "
            f"How many minutes does the trip take?"), d / speed * 60


def t_meet(r: random.Random) -> tuple[str, float]:
    a, b = two_names(r)
    va, vb, t = r.randrange(40, 90, 5), r.randrange(40, 90, 5), r.choice((1, 2, 3, 4))
    return (f"{a} and {b} start driving toward each other from two cities {(va + vb) * t} km apart. {a} drives "
            f"at {va} km/h and {b} at {vb} km/h. After how many hours do they meet?"), t


def t_together(r: random.Random) -> tuple[str, float]:
    a, b = two_names(r)
    ra, rb, hours = r.randint(3, 12), r.randint(3, 12), r.randint(2, 6)
    thing = r.choice(("bracelets", "paper cranes", "cupcakes", "birdhouses", "greeting cards"))
    return (f"{a} can make {ra} {thing} an hour and {b} can make {rb} an hour. Working together, how long "
            f"will it take them to make {(ra + rb) * hours} {thing}?"), hours


def t_typing(r: random.Random) -> tuple[str, float]:
    who, wpm, pages, words = r.choice(NAMES), r.choice((30, 40, 45, 50, 60)), r.randint(2, 6), r.choice((250, 300, 450, 500))
    return (f"{who} types {wpm} words per minute. An essay has {pages} pages with about {words} words on each page. "
            f"How many minutes will {who} need to type the essay?"), pages * words / wpm


def t_bathtub(r: random.Random) -> tuple[str, float]:
    fill, drain = r.randint(6, 12), r.randint(1, 5)
    minutes = r.randint(5, 15)
    return (f"A bathtub holds {(fill - drain) * minutes} gallons. The faucet pours in {fill} gallons a minute, "
            f"but the open drain lets out {drain} gallons a minute. How long until the empty tub is full?"), minutes


def t_give_fractions(r: random.Random) -> tuple[str, float]:
    who, (a, b), thing = r.choice(NAMES), two_names(r), r.choice(THINGS)
    p, q = r.choice((2, 3, 4, 5)), r.choice((2, 3, 4))
    total = p * q * r.randint(2, 8)
    rest = total - total // p
    return (f"{who} collected {total} {thing}. {who} gave 1/{p} of them to {a}, then gave 1/{q} of what remained "
            f"to {b}. How many {thing} does {who} still have?"), rest - rest // q


def t_fraction_group(r: random.Random) -> tuple[str, float]:
    club = r.choice(("chess club", "choir", "robotics team", "drama club", "hiking group"))
    den = r.choice((3, 4, 5, 8))
    part, n = r.randint(1, den - 1), den * r.randint(4, 12)
    return (f"The {club} has {n} members, and {part}/{den} of them are girls. How many boys are in the {club}?"
            ), n - n * part // den


def t_add_fractions(r: random.Random) -> tuple[str, float]:
    who = r.choice(NAMES)
    a, b = Fraction(r.randint(1, 3), 4), Fraction(r.randint(1, 2), 3)
    c = Fraction(r.randint(1, 5), 6)
    return (f"{who} jogged {a} of a mile on Monday, {b} of a mile on Wednesday and {c} of a mile on Friday. "
            f"How far did {who} jog this week? Give the answer as a fraction."), float(a + b + c)


def t_percent_rise(r: random.Random) -> tuple[str, float]:
    thing = r.choice(("a bus ticket", "a cup of coffee", "a movie ticket", "a loaf of bread", "a gym pass"))
    old = r.choice((2, 4, 5, 8, 10, 20, 25, 40))
    pct = r.choice((5, 10, 15, 20, 25, 30, 50))
    return (f"Last year {thing} cost {money(old)}. This year it costs {money(old * (100 + pct) / 100)}. "
            f"By what percent did the price go up?"), pct


def t_percent_vote(r: random.Random) -> tuple[str, float]:
    n, pct = r.randrange(200, 2000, 20), r.choice((35, 40, 45, 55, 60, 65, 70, 75))
    what = r.choice(("a new park", "a longer lunch break", "a school mascot", "a town festival"))
    return (f"In a survey of {n:,} people, {pct}% said they were in favor of {what}. "
            f"How many people were not in favor?"), n * (100 - pct) / 100


def t_quiz_score(r: random.Random) -> tuple[str, float]:
    who, total = r.choice(NAMES), r.choice((20, 25, 40, 50))
    right = r.randint(total // 2, total)
    return (f"On a quiz with {total} questions, {who} answered {right} correctly. "
            f"What percentage of the questions did {who} get right?"), right / total * 100


def t_compound(r: random.Random) -> tuple[str, float]:
    who, p, rate = r.choice(NAMES), r.choice((500, 800, 1000, 1500, 2500)), r.choice((2, 4, 5, 10))
    return (f"{who} puts {money(p)} in a savings account that adds {rate}% interest at the end of every year, "
            f"and the interest also earns interest. How much is in the account after 2 years?"), p * (1 + rate / 100) ** 2


def t_age_twice(r: random.Random) -> tuple[str, float]:
    kid, years = r.choice(NAMES), r.randint(2, 12)
    child = r.randint(4, 15)
    parent = 2 * (child + years) - years
    return (f"{kid} is {child} years old and {kid}'s mother is {parent}. In how many years will the mother be "
            f"exactly twice as old as {kid}?"), years


def t_age_chain(r: random.Random) -> tuple[str, float]:
    a, b, c = r.sample(NAMES, 3)
    age_a, more, k = r.randint(5, 14), r.randint(2, 9), r.choice((2, 3))
    return (f"{b} is {more} years older than {a}, and {c} is {k} times as old as {a}. If {a} is {age_a}, "
            f"what is the total of their three ages?"), age_a + age_a + more + k * age_a


def t_tiles(r: random.Random) -> tuple[str, float]:
    length, width, tile = r.randint(3, 9), r.randint(2, 7), r.choice((0.5, 0.25))
    return (f"A kitchen floor measures {length} m by {width} m. It is covered with square tiles that are "
            f"{num(tile)} m on each side. How many tiles are needed?"), length * width / tile**2


def t_square_from_area(r: random.Random) -> tuple[str, float]:
    side = r.randint(3, 25)
    what = r.choice(("square rug", "square sandbox", "square window", "square patio"))
    return f"A {what} has an area of {side * side} square feet. What is its perimeter?", 4 * side


def t_yard_path(r: random.Random) -> tuple[str, float]:
    length, width, bed = r.randint(12, 30), r.randint(8, 20), r.randint(2, 6)
    return (f"A rectangular lawn is {length} m long and {width} m wide. A square flower bed {bed} m on each side "
            f"is dug in the middle. How many square meters of grass are left?"), length * width - bed * bed


def t_box_volume(r: random.Random) -> tuple[str, float]:
    length, width, height = r.randint(2, 8), r.randint(2, 6), r.randint(2, 5)
    return (f"A toy box is {length} feet long, {width} feet wide and {height} feet tall. How many cube-shaped "
            f"blocks measuring 1 foot on each edge fit inside it?"), length * width * height


def t_aquarium(r: random.Random) -> tuple[str, float]:
    length, width, height = r.randrange(40, 120, 10), r.randrange(20, 50, 5), r.randrange(20, 60, 10)
    return (f"An aquarium measures {length} cm by {width} cm by {height} cm. How many liters of water does it "
            f"hold when full? (1 liter is 1,000 cubic centimeters.)"), length * width * height / 1000


def t_inches(r: random.Random) -> tuple[str, float]:
    a, b = r.randint(3, 9), r.randint(1, 11)
    who, piece = r.choice(NAMES), r.choice((4, 6, 8))
    return (f"{who} has a board that is {a} feet {b} inches long and cuts it into pieces {piece} inches long. "
            f"How many whole pieces does {who} get?"), (12 * a + b) // piece


def t_flour_bags(r: random.Random) -> tuple[str, float]:
    kg, grams = r.randint(2, 12), r.choice((250, 400, 500, 750))
    stuff = r.choice(("flour", "sugar", "coffee beans", "oats", "lentils"))
    return (f"A shop has {kg} kg of {stuff} and packs it into bags of {grams} grams each. How many full bags "
            f"can it fill?"), kg * 1000 // grams


def t_work_week(r: random.Random) -> tuple[str, float]:
    who, start, end, days = r.choice(NAMES), r.randint(7, 9), r.randint(15, 18), r.choice((4, 5, 6))
    lunch = r.choice((30, 45, 60))
    return (f"{who} works from {start} am to {end - 12} pm with a {lunch}-minute lunch break, {days} days a week. "
            f"How many hours does {who} work each week?"), (end - start - lunch / 60) * days


def t_smoothie(r: random.Random) -> tuple[str, float]:
    k, serv = r.randint(2, 4), r.choice((2, 3, 4))
    want = serv * r.randint(2, 6)
    return (f"A smoothie that serves {serv} people uses {k} bananas. How many bananas are needed to make "
            f"smoothies for {want} people?"), k * want / serv


def t_pencil_share(r: random.Random) -> tuple[str, float]:
    who, packs, per = r.choice(NAMES), r.randint(4, 8), r.choice((6, 10, 12))
    friends, each = r.randint(3, 7), r.randint(2, 3)  # at most 21 given away from at least 24
    thing = r.choice(("pencils", "markers", "erasers", "glue sticks"))
    return (f"{who} buys {packs} packs of {thing} with {per} in each pack and hands {each} to each of {friends} "
            f"classmates. How many {thing} does {who} keep?"), packs * per - friends * each


def t_compare_cards(r: random.Random) -> tuple[str, float]:
    a, b, c = r.sample(NAMES, 3)
    thing, base, more = r.choice(THINGS), r.randint(10, 60), r.randint(5, 30)
    return (f"{a} has {base} {thing}. {b} has {more} more than {a}, and {c} has half as many as {b}. "
            f"Who has the most {thing}, and how many more does that person have than the one with the fewest?"
            ), (base + more) - min(base, (base + more) / 2)


def t_phone_plans(r: random.Random) -> tuple[str, float]:
    base, per_gb, gb = r.randint(10, 25), r.choice((2, 3, 4, 5)), r.randint(3, 12)
    flat = base + per_gb * gb + r.choice((-1, 1)) * r.randint(3, 15)  # never a tie
    return (f"Plan A costs {money(base)} a month plus {money(per_gb)} for each gigabyte of data. Plan B costs a "
            f"flat {money(flat)} a month. For someone who uses {gb} GB a month, which plan is cheaper and by how much?"
            ), abs(base + per_gb * gb - flat)


def t_temperatures(r: random.Random) -> tuple[str, float]:
    days = r.choice((4, 5, 6))
    temps = [r.randint(1, 32) for _ in range(days)]
    listed = ", ".join(f"{t}°C" for t in temps[:-1]) + f" and {temps[-1]}°C"
    return (f"The noon temperatures in a town on {days} days were {listed}. What was the mean noon temperature?"
            ), sum(temps) / days


def t_machine_rate(r: random.Random) -> tuple[str, float]:
    made, minutes, hours = r.choice((30, 45, 60, 80, 120)), r.choice((5, 6, 10, 15)), r.randint(2, 9)
    thing = r.choice(("jars", "cans", "boxes of cereal", "toy bricks", "envelopes"))
    return (f"A packing machine fills {made} {thing} every {minutes} minutes. How many {thing} does it fill "
            f"in {hours} hours?"), made * 60 / minutes * hours


def t_tables(r: random.Random) -> tuple[str, float]:
    guests, seats = r.randint(25, 140), r.choice((6, 8, 10, 12))
    event = r.choice(("wedding", "school banquet", "birthday party", "charity dinner"))
    return (f"{guests} guests are coming to a {event}, and each table seats {seats}. What is the smallest number "
            f"of tables needed so that everyone has a seat?"), -(-guests // seats)


def t_share_remainder(r: random.Random) -> tuple[str, float]:
    who, thing, k = r.choice(NAMES), r.choice(THINGS), r.randint(3, 9)
    n = k * r.randint(4, 15) + r.randint(1, k - 1)
    return (f"{who} shares {n} {thing} equally among {k} friends and keeps whatever cannot be shared evenly. "
            f"How many does each friend get, and how many does {who} keep?"), n // k


def t_overtime(r: random.Random) -> tuple[str, float]:
    who, rate, hours = r.choice(NAMES), r.choice((12, 15, 16, 20, 22, 24)), r.randint(42, 55)
    return (f"{who} is paid {money(rate)} an hour for the first 40 hours of a week and time and a half for every "
            f"hour after that. How much does {who} earn in a week of {hours} hours?"), 40 * rate + (hours - 40) * rate * 1.5


def t_commission(r: random.Random) -> tuple[str, float]:
    who, base, pct, sales = r.choice(NAMES), r.choice((300, 400, 500)), r.choice((3, 5, 8, 10)), r.randrange(2000, 9000, 250)
    return (f"A salesperson named {who} earns a weekly base pay of {money(base)} plus {pct}% commission on sales. "
            f"This week {who} sold {money(sales)} worth of goods. What is {who}'s pay for the week?"), base + sales * pct / 100


def t_basketball(r: random.Random) -> tuple[str, float]:
    who, twos, threes, free = r.choice(NAMES), r.randint(2, 10), r.randint(1, 6), r.randint(2, 8)
    return (f"In a basketball game {who} made {twos} two-point shots, {threes} three-pointers and {free} free "
            f"throws worth one point each. How many points did {who} score?"), 2 * twos + 3 * threes + free


def t_laps(r: random.Random) -> tuple[str, float]:
    who, lap, laps, days = r.choice(NAMES), r.choice((200, 250, 400)), r.randint(4, 15), r.randint(2, 5)
    return (f"{who} runs {laps} laps around a {lap}-meter track, {days} times a week. How many kilometers is that "
            f"each week?"), lap * laps * days / 1000


def t_homework_clock(r: random.Random) -> tuple[str, float]:
    who, hour, minute = r.choice(NAMES), r.randint(1, 5), r.choice((0, 10, 15, 20, 30, 45))
    parts = [r.choice((20, 25, 30, 35, 40)), r.choice((15, 20, 25)), r.choice((10, 15))]
    end = hour * 60 + minute + sum(parts)
    return (f"{who} starts homework at {hour}:{minute:02d} pm, spends {parts[0]} minutes on science, {parts[1]} "
            f"minutes on spelling and takes a {parts[2]}-minute snack break in between. At what time is {who} done?"
            ), end


def t_consecutive(r: random.Random) -> tuple[str, float]:
    first, kind = r.randrange(2, 60, 2), r.choice(("even", "odd"))
    first += kind == "odd"
    return (f"The sum of three consecutive {kind} numbers is {3 * first + 6}. What is the largest of the three?"
            ), first + 4


def t_think_number(r: random.Random) -> tuple[str, float]:
    who, x, a, b = r.choice(NAMES), r.randint(2, 20), r.randint(2, 9), r.randint(1, 30)
    return (f"{who} thinks of a number, multiplies it by {a} and then adds {b}. The result is {a * x + b}. "
            f"What number did {who} start with?"), x


def t_ratio(r: random.Random) -> tuple[str, float]:
    a, b, k = r.randint(1, 5), r.randint(2, 7), r.randint(3, 12)
    pair = r.choice((("red", "yellow", "tulips"), ("black", "white", "pawns"), ("oak", "maple", "trees")))
    return (f"The ratio of {pair[0]} to {pair[1]} {pair[2]} in a garden is {a}:{b}. There are {(a + b) * k} {pair[2]} "
            f"in all. How many are {pair[1]}?"), b * k


def t_speed_units(r: random.Random) -> tuple[str, float]:
    kmh = r.choice((18, 36, 54, 72, 90, 108))
    animal = r.choice(("A horse", "A cheetah", "A scooter", "A deer", "An ostrich"))
    return f"{animal} moves at {kmh} km/h. What is that speed in meters per second?", kmh / 3.6


def t_truck_load(r: random.Random) -> tuple[str, float]:
    box, limit, already = r.choice((12, 15, 20, 25, 30)), r.randrange(800, 3000, 100), r.randrange(100, 600, 50)
    return (f"A delivery truck can carry at most {limit:,} kg. It already holds {already} kg of furniture. Each crate "
            f"of tiles weighs {box} kg. How many crates can still be loaded?"), (limit - already) // box


def t_lemonade(r: random.Random) -> tuple[str, float]:
    a, b = two_names(r)
    cost, price, fixed, cups = r.choice((0.25, 0.3, 0.4, 0.5)), r.choice((1, 1.25, 1.5, 2)), r.randint(8, 15), r.randint(40, 90)
    return (f"{a} and {b} run a lemonade stand. Each cup costs {money(cost)} to make and sells for {money(price)}. "
            f"They also spent {money(fixed)} on a sign and a table. What is their profit after selling {cups} cups?"
            ), cups * (price - cost) - fixed


MATH_TEMPLATES: tuple[Template, ...] = (
    t_change, t_discount, t_unit_price, t_budget, t_chores, t_two_legs, t_trip_minutes, t_meet, t_together,
    t_typing, t_bathtub, t_give_fractions, t_fraction_group, t_add_fractions, t_percent_rise, t_percent_vote,
    t_quiz_score, t_compound, t_age_twice, t_age_chain, t_tiles, t_square_from_area, t_yard_path, t_box_volume,
    t_aquarium, t_inches, t_flour_bags, t_work_week, t_smoothie, t_pencil_share, t_compare_cards, t_phone_plans,
    t_temperatures, t_machine_rate, t_tables, t_share_remainder, t_overtime, t_commission, t_basketball, t_laps,
    t_homework_clock, t_consecutive, t_think_number, t_ratio, t_speed_units, t_truck_load, t_lemonade,
)


def math_problem(r: random.Random) -> tuple[str, str, float]:
    """(template name, problem text, answer): a random template with a random opener and closer."""
    template = r.choice(MATH_TEMPLATES)
    text, answer = template(r)
    return template.__name__[2:], r.choice(OPENERS) + text + r.choice(CLOSERS), float(answer)
