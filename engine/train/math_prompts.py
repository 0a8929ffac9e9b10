"""The `math` evaluation set: word problems written for this project (GSM8K-like, 2-5 arithmetic
steps each). Evaluation only: they never enter training data (math_templates.py makes those).
"""

from __future__ import annotations

MATH_PROMPTS: tuple[str, ...] = (
    (
        "A bakery sells muffins for $3 each and cookies for $1.50 each. Maya buys 4 muffins and "
        "6 cookies. How much does she spend in total?"
    ),
    (
        "A train leaves at 9:15 am and travels 180 miles at 60 miles per hour. At what time does "
        "it arrive?"
    ),
    (
        "Tom has 48 marbles. He gives a quarter of them to his sister and then buys 15 more. How "
        "many marbles does he have now?"
    ),
    (
        "A garden is 12 meters long and 7 meters wide. Fencing costs $8 per meter. How much does "
        "it cost to fence the whole garden?"
    ),
    (
        "Lena reads 25 pages on weekdays and 40 pages on each weekend day. How many pages does she "
        "read in two weeks?"
    ),
    (
        "A school has 420 students. 55% of them take the bus, and a third of the rest walk. How "
        "many students walk to school?"
    ),
    (
        "A phone costs $600. It is on sale for 15% off, and then a $30 coupon is applied. What is "
        "the final price?"
    ),
    (
        "Carlos earns $18 per hour and works 7 hours a day, 5 days a week. How much does he earn "
        "in 4 weeks?"
    ),
    (
        "A tank holds 250 liters of water. It leaks 3 liters every hour. After one full day, how "
        "much water is left?"
    ),
    (
        "There are 3 red, 5 blue and 7 green balloons in each party bag. How many balloons are in "
        "9 party bags, and how many of them are green?"
    ),
    (
        "A recipe needs 2.5 cups of flour for 10 pancakes. How much flour is needed for 34 "
        "pancakes?"
    ),
    (
        "Priya is 4 years older than her brother. In 6 years the sum of their ages will be 40. How "
        "old is Priya now?"
    ),
    (
        "A car uses 7 liters of fuel per 100 km. Fuel costs $1.80 per liter. How much does a "
        "450 km trip cost in fuel?"
    ),
    (
        "A farmer has chickens and cows. There are 30 heads and 86 legs in total. How many cows "
        "does the farmer have?"
    ),
    (
        "A bookstore sold 120 books on Monday, 20% more on Tuesday, and half of Tuesday's amount "
        "on Wednesday. How many books were sold over the three days?"
    ),
    (
        "Sam saves $12 every week. He already has $45. How many weeks until he can buy a bike that "
        "costs $249?"
    ),
    "A rectangle has a perimeter of 54 cm and its length is twice its width. What is its area?",
    (
        "A pizza is cut into 12 slices. Ana eats 3 slices, Ben eats a third of what is left, and "
        "Cleo eats 2 slices. How many slices remain?"
    ),
    (
        "A factory makes 1,250 bottles an hour. 2% of them are defective. How many good bottles "
        "does it make in an 8-hour shift?"
    ),
    (
        "Jasmine bought 3 notebooks at $2.75 each and a pen for $1.40. She paid with a $20 bill. "
        "How much change did she get?"
    ),
    (
        "A swimming pool is filled by two pipes. One fills it in 6 hours, the other in 3 hours. "
        "How long does it take with both pipes open?"
    ),
    (
        "The average of five test scores is 82. The first four scores are 75, 88, 79 and 90. What "
        "is the fifth score?"
    ),
    (
        "A cyclist rides uphill at 12 km/h for 30 minutes and downhill at 30 km/h for 20 minutes. "
        "How far does she ride in total?"
    ),
    (
        "A class of 28 students is split into groups of 4. Each group needs 3 sheets of poster "
        "paper, sold in packs of 10. How many packs must the teacher buy?"
    ),
    (
        "Omar's monthly rent is $1,150, which is 25% of his monthly income. What is his yearly "
        "income?"
    ),
    (
        "A store buys shirts for $14 and sells them for $22. How many shirts must it sell to make "
        "a profit of $400?"
    ),
    (
        "Water costs $0.004 per liter. A family uses 320 liters a day. What is their water bill "
        "for a 30-day month?"
    ),
    "A movie starts at 7:40 pm and lasts 2 hours and 35 minutes. What time does it end?",
    (
        "Emma has twice as many stickers as Noah, and Noah has 8 fewer than Liam. Liam has 23 "
        "stickers. How many stickers do the three have together?"
    ),
    (
        "A map uses a scale of 1 cm to 25 km. Two towns are 7.4 cm apart on the map. What is the "
        "real distance between them?"
    ),
    "A hotel room costs $95 a night plus 12% tax. What is the total for a 4-night stay?",
    (
        "Three friends share a $84 dinner bill. They add a 15% tip and split everything equally. "
        "How much does each person pay?"
    ),
    (
        "A library had 3,600 books. It gave away 8% of them and then received 450 new books. How "
        "many books does it have now?"
    ),
    (
        "A runner completes a 10 km race in 52 minutes. What is her average pace in minutes per "
        "kilometer, and how long would 21 km take at the same pace?"
    ),
    (
        "A box holds 24 eggs. A farm collects 310 eggs a day. How many full boxes can it pack in a "
        "week, and how many eggs are left over?"
    ),
    (
        "Nina invests $2,000 at 5% simple interest per year. How much money will she have after "
        "3 years?"
    ),
    (
        "A printer prints 18 pages per minute. How many minutes does it need to print 15 copies of "
        "a 42-page report?"
    ),
    (
        "In a jar there are 60 candies: 1/4 are lemon, 1/3 are cherry and the rest are mint. How "
        "many mint candies are there?"
    ),
    (
        "A plane flies 2,340 km in 3 hours and 15 minutes. What is its average speed in km per "
        "hour?"
    ),
    (
        "A painter needs 1 liter of paint for every 9 square meters. A wall is 4.5 m high and 12 m "
        "long and needs two coats. How many liters of paint are needed?"
    ),
    (
        "Ravi scored 14, 22, 18 and 26 points in four games. How many points does he need in the "
        "fifth game to average 21 points per game?"
    ),
    (
        "A shop sells apples in bags of 6 for $4.20 or singly for $0.80 each. How much does a "
        "customer save by buying 3 bags instead of 18 single apples?"
    ),
)
